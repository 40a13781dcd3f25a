//! Meta-gradient checks on a tiny random Llama in f64: exact MAML and FOMAML against central
//! finite differences of their objectives, Hessian-free MAML against exact MAML.

use candle_core::{DType, Tensor, Var};

use super::maml::{self, EpisodeLoss, InnerLoop};
use super::LmEpisode;
use crate::data::batch::Sequence;
use crate::model::testing::tiny_llama;
use crate::model::{Arch, Llama};
use crate::ops::gradcheck::randn_f64;
use crate::params::ParamStore;
use crate::peft::config::DeltaConfig;
use crate::peft::lora::LoraConfig;
use crate::peft::DeltaSet;
use crate::Result;

fn seqs(n: usize, t: usize, seed: u64) -> Vec<Sequence> {
    (0..n)
        .map(|i| {
            let ids: Vec<u32> = (0..=t)
                .map(|j| {
                    (1 + (seed * 31 + i as u64 * 17 + j as u64 * 7 + (j * j) as u64) % 31) as u32
                })
                .collect();
            Sequence {
                ids: ids[..t].to_vec(),
                targets: ids[1..].iter().map(|&x| x as i64).collect(),
            }
        })
        .collect()
}

struct Setup {
    model: Llama,
    base: ParamStore,
    deltas: DeltaSet,
    /// LoRA values (B perturbed so every path is active).
    init: ParamStore,
}

fn setup() -> Result<Setup> {
    let (model, base) = tiny_llama(3, DType::F64)?;
    let arch = Arch::Llama(model.cfg.clone());
    let cfg = DeltaConfig::Lora(LoraConfig::new(2, 4.0, &["q_proj", "v_proj", "down_proj"]));
    let ad = cfg.init(&arch, &base, 5)?;
    let mut init = ParamStore::new();
    for (i, (name, p)) in ad.params.iter().enumerate() {
        let t = p.tensor().to_dtype(DType::F64)?;
        let t = (t + randn_f64(p.tensor().dims(), 100 + i as u64, 0.2)?)?;
        init.insert_frozen(name, t);
    }
    let deltas = ad.attach(&arch, &base)?;
    Ok(Setup {
        model,
        base,
        deltas,
        init,
    })
}

fn episode(s: &Setup) -> LmEpisode<'_> {
    LmEpisode {
        model: &s.model,
        deltas: &s.deltas,
        support: seqs(4, 6, 1),
        query: seqs(3, 5, 2),
        batch: 2,
        pad: 0,
    }
}

/// `values` as meta-variables: a store of fresh `Var`s and the list of them.
fn as_vars(values: &ParamStore) -> Result<(ParamStore, Vec<(String, Var)>)> {
    let mut st = ParamStore::new();
    for (n, p) in values.iter() {
        st.insert_trainable(n, Var::from_tensor(&p.tensor().detach())?);
    }
    let vars = st.vars();
    Ok((st, vars))
}

fn dot(a: &[Option<Tensor>], d: &[Tensor]) -> Result<f64> {
    let mut s = 0.0;
    for (g, d) in a.iter().zip(d) {
        if let Some(g) = g {
            s += (g * d)?.sum_all()?.to_scalar::<f64>()?;
        }
    }
    Ok(s)
}

fn flat(a: &[Option<Tensor>], like: &[(String, Var)]) -> Result<Vec<f64>> {
    let mut out = vec![];
    for (g, (_, v)) in a.iter().zip(like) {
        match g {
            Some(g) => out.extend(g.flatten_all()?.to_vec1::<f64>()?),
            None => out.extend(vec![0.0; v.elem_count()]),
        }
    }
    Ok(out)
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let n: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    d / n.max(1e-12)
}

fn directions(vars: &[(String, Var)], seed: u64) -> Result<Vec<Tensor>> {
    vars.iter()
        .enumerate()
        .map(|(i, (_, v))| Ok(randn_f64(v.dims(), seed + i as u64, 1.0)?))
        .collect()
}

/// `store` with each meta-variable moved by `h * d`.
fn moved(store: &ParamStore, vars: &[(String, Var)], d: &[Tensor], h: f64) -> Result<ParamStore> {
    let mut out = ParamStore::new();
    for (n, p) in store.iter() {
        let t = match vars.iter().position(|(vn, _)| vn == n) {
            Some(i) => (p.tensor() + (&d[i] * h)?)?,
            None => p.tensor().clone(),
        };
        out.insert_frozen(n, t.detach());
    }
    Ok(out)
}

const ALL: &(dyn Fn(&str) -> bool + Sync) = &|_: &str| true;

/// The meta-objective F(init, base) = query loss after the inner loop, as a plain number.
fn objective(
    task: &dyn EpisodeLoss,
    base: &ParamStore,
    init: &ParamStore,
    inner: &InnerLoop,
) -> Result<f64> {
    let (fast, _) = maml::adapted(task, base, init, inner)?;
    Ok(task.query(&base.detached(), &fast)?.to_scalar::<f64>()?)
}

#[test]
fn exact_maml_matches_finite_differences_and_differs_from_first_order() -> Result<()> {
    let s = setup()?;
    let task = episode(&s);
    // A base norm weight is meta-learned too: its gradient includes the second-order cross terms.
    let mut base = s.base.clone();
    base.make_trainable(|n| n == "model.layers.1.post_attention_layernorm.weight")?;
    let (init, mut meta) = as_vars(&s.init)?;
    meta.extend(base.vars());
    let inner = InnerLoop {
        steps: 2,
        lr: 0.5,
        adapted: ALL,
        learned_lrs: None,
    };
    let exact = maml::exact(&task, &base, &init, &inner, &meta)?;
    assert!(exact.grads.iter().all(Option::is_some));
    for seed in [1u64, 2, 3] {
        let d = directions(&meta, 1000 * seed)?;
        let h = 1e-5;
        let f = |sign: f64| -> Result<f64> {
            let i2 = moved(&init, &meta, &d, sign * h)?;
            let b2 = moved(&base, &meta, &d, sign * h)?;
            objective(&task, &b2, &i2, &inner)
        };
        let numeric = (f(1.0)? - f(-1.0)?) / (2.0 * h);
        let analytic = dot(&exact.grads, &d)?;
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-8);
        assert!(
            rel < 1e-3,
            "direction {seed}: exact {analytic} vs FD {numeric} (rel {rel:.2e})"
        );
    }
    let fo = maml::first_order(&task, &base, &init, &inner, &meta)?;
    let diff = rel_l2(&flat(&fo.grads, &meta)?, &flat(&exact.grads, &meta)?);
    assert!(
        diff > 1e-2,
        "first-order equals exact ({diff:.2e}): the check would not see second-order terms"
    );
    assert!((fo.query_loss - exact.query_loss).abs() < 1e-10);
    Ok(())
}

#[test]
fn first_order_maml_is_the_query_gradient_at_the_adapted_weights() -> Result<()> {
    let s = setup()?;
    let task = episode(&s);
    let (init, meta) = as_vars(&s.init)?;
    let inner = InnerLoop {
        steps: 3,
        lr: 0.3,
        adapted: ALL,
        learned_lrs: None,
    };
    let fo = maml::first_order(&task, &s.base, &init, &inner, &meta)?;
    let (fast, losses) = maml::adapted(&task, &s.base, &init, &inner)?;
    assert_eq!(losses.len(), 3);
    assert_eq!(fo.support_losses, losses);
    for seed in [4u64, 5] {
        let d = directions(&meta, 1000 * seed)?;
        let h = 1e-5;
        let f = |sign: f64| -> Result<f64> {
            Ok(task
                .query(&s.base, &moved(&fast, &meta, &d, sign * h)?)?
                .to_scalar::<f64>()?)
        };
        let numeric = (f(1.0)? - f(-1.0)?) / (2.0 * h);
        let analytic = dot(&fo.grads, &d)?;
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-8);
        assert!(
            rel < 1e-3,
            "FOMAML {analytic} vs FD {numeric} (rel {rel:.2e})"
        );
    }
    Ok(())
}

#[test]
fn hessian_free_maml_matches_exact_maml() -> Result<()> {
    let s = setup()?;
    let task = episode(&s);
    let mut base = s.base.clone();
    base.make_trainable(|n| n == "model.norm.weight")?;
    // ANIL-like: only the last layer's LoRA adapts; layer 0's is meta-learned but fixed inside.
    let last_layer = |n: &str| n.contains("layers.1.");
    for adapted in [ALL, &last_layer as &(dyn Fn(&str) -> bool + Sync)] {
        let (init, mut meta) = as_vars(&s.init)?;
        meta.extend(base.vars());
        for steps in [1, 2] {
            let inner = InnerLoop {
                steps,
                lr: 0.5,
                adapted,
                learned_lrs: None,
            };
            let exact = maml::exact(&task, &base, &init, &inner, &meta)?;
            let hf = maml::hessian_free(&task, &base, &init, &inner, &meta, 1e-4)?;
            let e = flat(&exact.grads, &meta)?;
            let rel = rel_l2(&flat(&hf.grads, &meta)?, &e);
            assert!(
                rel < 1e-2,
                "{steps} steps: Hessian-free vs exact rel. L2 error {rel:.2e}"
            );
            let fo = flat(
                &maml::first_order(&task, &base, &init, &inner, &meta)?.grads,
                &meta,
            )?;
            assert!(
                rel_l2(&fo, &e) > 10.0 * rel,
                "the check cannot tell first-order from exact"
            );
        }
    }
    Ok(())
}

#[test]
fn exact_maml_through_an_anil_inner_loop_matches_finite_differences() -> Result<()> {
    let s = setup()?;
    let task = episode(&s);
    let last_layer = |n: &str| n.contains("layers.1.");
    let (init, meta) = as_vars(&s.init)?;
    let inner = InnerLoop {
        steps: 2,
        lr: 0.5,
        adapted: &last_layer,
        learned_lrs: None,
    };
    let exact = maml::exact(&task, &s.base, &init, &inner, &meta)?;
    let d = directions(&meta, 77)?;
    let h = 1e-5;
    let f = |sign: f64| objective(&task, &s.base, &moved(&init, &meta, &d, sign * h)?, &inner);
    let numeric = (f(1.0)? - f(-1.0)?) / (2.0 * h);
    let analytic = dot(&exact.grads, &d)?;
    assert!(
        (analytic - numeric).abs() / numeric.abs() < 1e-3,
        "{analytic} vs {numeric}"
    );
    Ok(())
}

#[test]
fn meta_sgd_rate_gradient_matches_finite_differences_for_one_step() -> Result<()> {
    // With one inner step the first-order rate gradient -g * dLq/dtheta_1 is exact.
    let s = setup()?;
    let task = episode(&s);
    let (init, mut meta) = as_vars(&s.init)?;
    let mut lrs = ParamStore::new();
    for (n, p) in s.init.iter() {
        let r = (p.tensor().ones_like()? * 0.3)?;
        lrs.insert_trainable(n, Var::from_tensor(&r)?);
    }
    let rate_vars = lrs.vars();
    meta.extend(rate_vars.clone());
    let inner = InnerLoop {
        steps: 1,
        lr: 0.0,
        adapted: ALL,
        learned_lrs: Some(&lrs),
    };
    let g = maml::first_order(&task, &s.base, &init, &inner, &meta)?;
    let n_init = init.vars().len();
    let rate_grads = &g.grads[n_init..];
    let d = directions(&rate_vars, 9)?;
    let h = 1e-6;
    let f = |sign: f64| -> Result<f64> {
        let l2 = moved(&lrs, &rate_vars, &d, sign * h)?;
        let (l2s, _) = as_vars(&l2)?;
        let inner2 = InnerLoop {
            learned_lrs: Some(&l2s),
            ..inner
        };
        objective(&task, &s.base, &init, &inner2)
    };
    let numeric = (f(1.0)? - f(-1.0)?) / (2.0 * h);
    let analytic = dot(rate_grads, &d)?;
    assert!(
        (analytic - numeric).abs() / numeric.abs() < 1e-4,
        "{analytic} vs {numeric}"
    );
    Ok(())
}

#[test]
fn reptile_points_from_the_adapted_weights_back_to_the_init() -> Result<()> {
    let s = setup()?;
    let task = episode(&s);
    let (init, meta) = as_vars(&s.init)?;
    let inner = InnerLoop {
        steps: 3,
        lr: 0.2,
        adapted: ALL,
        learned_lrs: None,
    };
    let r = maml::reptile(&task, &s.base, &init, &inner, &meta)?;
    let (fast, _) = maml::adapted(&task, &s.base, &init, &inner)?;
    for ((n, v), g) in meta.iter().zip(&r.grads) {
        let want = (v.as_tensor() - fast.get(n)?)?;
        let got = g.as_ref().expect("every adapted entry has a direction");
        let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(err < 1e-12, "{n}: {err}");
    }
    assert!(
        r.support_losses[2] < r.support_losses[0],
        "{:?}",
        r.support_losses
    );
    Ok(())
}

/// With TAMS the architecture is a non-adapted entry carrying a graph to the controller: the
/// first-order meta-gradient of the controller is the gradient of the query loss at the adapted
/// weights as the architecture moves (soft mode, where it is a true gradient).
#[test]
fn tams_controller_gets_the_query_gradient_through_the_architecture() -> Result<()> {
    use super::tams::{self, ArchMode, TamsConfig};
    use crate::peft::config::ModelDims;
    let s = setup()?;
    let arch_cfg = Arch::Llama(s.model.cfg.clone());
    let dims = ModelDims::of(&arch_cfg);
    let tc = TamsConfig {
        reduced_dim: 4,
        controller_hidden: 6,
        layers: Some(vec![1]),
        ..TamsConfig::default()
    };
    let tp = tc.init(dims, &s.base, 3)?.to_dtype(DType::F64)?;
    // A non-zero output projection, so the cell (and so the architecture) matters.
    let mut tparams = ParamStore::new();
    for (i, (n, p)) in tp.iter().enumerate() {
        let t = if n.ends_with("out.weight") {
            (p.tensor() + randn_f64(p.tensor().dims(), 50 + i as u64, 0.3)?)?
        } else {
            p.tensor().clone()
        };
        tparams.insert_trainable(n, Var::from_tensor(&t)?);
    }
    let (cell, controller) = tc.build(dims, &tparams)?;
    let mut deltas = DeltaSet::none();
    let lora = DeltaConfig::Lora(LoraConfig::new(2, 4.0, &["q_proj", "v_proj", "down_proj"]));
    deltas.push_boxed(lora.build(&arch_cfg, &s.base, &s.init)?);
    deltas.push(cell);
    let task = LmEpisode {
        deltas: &deltas,
        ..episode(&s)
    };
    let emb = tams::task_embedding(
        &s.base,
        &crate::model::testing::token_ids(2, 6, 32, 1)?,
        None,
    )?;
    let arch_of = |p: &ParamStore| controller.arch_weights(&emb, p, ArchMode::Soft, None);
    let (lora_init, mut meta) = as_vars(&s.init)?;
    let mut init = lora_init.clone();
    for (n, p) in tparams.iter() {
        if !n.starts_with("tams.controller.") {
            init.insert(n, p.clone());
        }
    }
    init.insert_frozen(tams::ARCH, arch_of(&tparams)?);
    let ctrl: Vec<(String, Var)> = tparams
        .vars()
        .into_iter()
        .filter(|(n, _)| n.starts_with("tams.controller."))
        .collect();
    meta.extend(ctrl.clone());
    let not_arch = |n: &str| n != tams::ARCH;
    let inner = InnerLoop {
        steps: 2,
        lr: 0.3,
        adapted: &not_arch,
        learned_lrs: None,
    };
    let fo = maml::first_order(&task, &s.base, &init, &inner, &meta)?;
    let (fast, _) = maml::adapted(&task, &s.base, &init, &inner)?;
    let ctrl_grads = &fo.grads[meta.len() - ctrl.len()..];
    assert!(ctrl_grads.iter().all(Option::is_some));
    let d = directions(&ctrl, 31)?;
    let h = 1e-5;
    let f = |sign: f64| -> Result<f64> {
        let moved_ctrl = moved(&tparams, &ctrl, &d, sign * h)?;
        let mut st = fast.clone();
        st.insert_frozen(tams::ARCH, arch_of(&moved_ctrl)?);
        Ok(task.query(&s.base, &st)?.to_scalar::<f64>()?)
    };
    let numeric = (f(1.0)? - f(-1.0)?) / (2.0 * h);
    let analytic = dot(ctrl_grads, &d)?;
    assert!(
        numeric.abs() > 1e-8,
        "the architecture does not affect the loss"
    );
    assert!(
        (analytic - numeric).abs() / numeric.abs() < 1e-4,
        "{analytic} vs {numeric}"
    );
    Ok(())
}

/// A tagging episode on a tiny BERT: the head in the fast store is adapted in the inner loop and
/// its initial values are meta-variables; exact MAML through the encoder and the per-token
/// loss (ignored positions included) matches finite differences.
#[test]
fn exact_maml_on_a_tagging_episode_meta_learns_the_head() -> Result<()> {
    use super::episode::TagEpisode;
    use crate::data::batch::{TagItem, IGNORE};
    use crate::model::testing::tiny_bert;
    use crate::train::objectives::{HEAD_B, HEAD_W};

    let (model, base) = tiny_bert(4, DType::F64)?;
    let arch = Arch::Bert(model.cfg.clone());
    let cfg = DeltaConfig::Lora(LoraConfig::new(2, 4.0, &["query", "value"]));
    let ad = cfg.init(&arch, &base, 5)?;
    let mut values = ParamStore::new();
    for (i, (name, p)) in ad.params.iter().enumerate() {
        let t = p.tensor().to_dtype(DType::F64)?;
        values.insert_frozen(
            name,
            (t + randn_f64(p.tensor().dims(), 200 + i as u64, 0.2)?)?,
        );
    }
    let (tags, hidden) = (3, model.cfg.hidden_size);
    values.insert_frozen(HEAD_W, randn_f64(&[tags, hidden], 300, 0.3)?);
    values.insert_frozen(HEAD_B, randn_f64(&[tags], 301, 0.1)?);
    let deltas = ad.attach(&arch, &base)?;
    let vocab = model.cfg.vocab_size as u64;
    let item = |len: usize, seed: u64| -> TagItem {
        let ids: Vec<u32> = (0..len)
            .map(|j| (1 + (seed * 13 + j as u64 * 7) % (vocab - 1)) as u32)
            .collect();
        // Special tokens at both ends and every third token a continuation sub-token: ignored.
        let targets = (0..len)
            .map(|j| {
                if j == 0 || j + 1 == len || j % 3 == 2 {
                    IGNORE
                } else {
                    ((seed + j as u64) % tags as u64) as i64
                }
            })
            .collect();
        TagItem {
            ids,
            word_of: vec![None; len],
            targets,
            gold: vec![],
        }
    };
    let task = TagEpisode {
        model: &model,
        deltas: &deltas,
        support: vec![item(6, 1), item(5, 2), item(7, 3)],
        query: vec![item(6, 4), item(4, 5)],
        batch: 2,
        pad: 0,
    };
    let (init, meta) = as_vars(&values)?;
    let inner = InnerLoop {
        steps: 2,
        lr: 0.5,
        adapted: ALL,
        learned_lrs: None,
    };
    let exact = maml::exact(&task, &base, &init, &inner, &meta)?;
    let head_at = meta.iter().position(|(n, _)| n == HEAD_W).unwrap();
    assert!(exact.grads[head_at].is_some());
    for seed in [1u64, 2] {
        let d = directions(&meta, 2000 * seed)?;
        let h = 1e-5;
        let f = |sign: f64| objective(&task, &base, &moved(&init, &meta, &d, sign * h)?, &inner);
        let numeric = (f(1.0)? - f(-1.0)?) / (2.0 * h);
        let analytic = dot(&exact.grads, &d)?;
        let rel = (analytic - numeric).abs() / numeric.abs().max(1e-8);
        assert!(
            rel < 1e-3,
            "direction {seed}: exact {analytic} vs FD {numeric} (rel {rel:.2e})"
        );
    }
    Ok(())
}
