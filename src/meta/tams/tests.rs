//! TAMS tests on the tiny random Llama: gradients against finite differences (f64), the
//! straight-through estimator, causality of the convolution ops, identity at init, formats and
//! error messages.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, SeedableRng};

use super::*;
use crate::generate::Decoder;
use crate::model::testing::{tiny_bert, tiny_llama, token_ids};
use crate::model::{Arch, KvCache, Llama};
use crate::ops::gradcheck;
use crate::peft::DeltaSet;

fn config() -> TamsConfig {
    TamsConfig {
        reduced_dim: 4,
        controller_hidden: 8,
        ..TamsConfig::default()
    }
}

struct Setup {
    model: Llama,
    base: ParamStore,
    dims: ModelDims,
    params: ParamStore,
    deltas: DeltaSet,
    controller: Controller,
}

/// The tiny Llama with a cell in both layers; `perturb` makes every parameter (including the
/// zero-initialised output projection) act.
fn setup(dtype: DType, perturb: bool) -> Result<Setup> {
    let (model, base) = tiny_llama(11, dtype)?;
    let dims = ModelDims::of(&Arch::Llama(model.cfg.clone()));
    let cfg = config();
    let fresh = cfg.init(dims, &base, 5)?.to_dtype(dtype)?;
    let params = if perturb {
        let mut p = ParamStore::new();
        for (i, (name, t)) in fresh.iter().enumerate() {
            let t = t.tensor();
            let noise = gradcheck::randn_f64(t.dims(), 100 + i as u64, 0.4)?.to_dtype(dtype)?;
            p.insert_trainable(name, Var::from_tensor(&(t + noise)?)?);
        }
        p
    } else {
        fresh
    };
    let (cell, controller) = cfg.build(dims, &params)?;
    let mut deltas = DeltaSet::none();
    deltas.push(cell);
    Ok(Setup {
        model,
        base,
        dims,
        params,
        deltas,
        controller,
    })
}

impl Setup {
    fn logits(&self, params: &ParamStore, ids: &Tensor) -> Result<Tensor> {
        self.model
            .forward(&self.base, &self.deltas, params, ids, None)
    }

    fn task_embedding(&self) -> Result<Tensor> {
        task_embedding(&self.base, &token_ids(2, 5, 32, 9)?, None)
    }

    fn soft_arch(&self) -> Result<Tensor> {
        let emb = self.task_embedding()?;
        Ok(self
            .controller
            .arch_weights(&emb, &self.params, ArchMode::Soft, None)?
            .detach())
    }

    /// `params` with the tensors named in `names` replaced by `xs` (so autodiff sees them).
    fn replaced(&self, names: &[&str], xs: &[Tensor]) -> ParamStore {
        let mut s = ParamStore::new();
        for (n, p) in self.params.iter() {
            match names.iter().position(|q| *q == n) {
                Some(i) => s.insert_frozen(n, xs[i].clone()),
                None => s.insert_frozen(n, p.tensor().clone()),
            }
        }
        s
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

fn wrap<T>(r: Result<T>) -> candle_core::Result<T> {
    r.map_err(candle_core::Error::wrap)
}

#[test]
fn fresh_cell_leaves_logits_unchanged() -> Result<()> {
    let s = setup(DType::F32, false)?;
    let ids = token_ids(2, 6, 32, 1)?;
    let plain = s
        .model
        .forward(&s.base, &DeltaSet::none(), &ParamStore::new(), &ids, None)?;
    let emb = s.task_embedding()?;
    for mode in [ArchMode::Soft, ArchMode::Hard] {
        let arch = s.controller.arch_weights(&emb, &s.params, mode, None)?;
        let got = s.logits(&with_arch(&s.params, arch)?, &ids)?;
        let diff = max_diff(&got, &plain)?;
        assert!(
            diff == 0.0,
            "{mode:?}: a fresh cell changes logits by {diff}"
        );
    }
    // And the perturbed cell does act, so the comparison above can fail.
    let p = setup(DType::F32, true)?;
    let got = p.logits(&with_arch(&p.params, p.soft_arch()?)?, &ids)?;
    assert!(max_diff(&got, &plain)? > 1e-3);
    Ok(())
}

#[test]
fn cell_gradient_wrt_its_parameters_matches_finite_differences() -> Result<()> {
    let s = setup(DType::F64, true)?;
    let ids = token_ids(1, 6, 32, 2)?;
    // Soft weights: every op of every edge is in the forward.
    let params = with_arch(&s.params, s.soft_arch()?)?;
    let names = [
        "tams.layers.0.in_x.weight",
        "tams.layers.1.in_ffn.weight",
        "tams.layers.1.out.weight",
        "tams.layers.0.edges.0.linear.weight",
        "tams.layers.0.edges.4.linear.bias",
        "tams.layers.1.edges.2.glu.weight",
        "tams.layers.0.edges.7.glu.bias",
        "tams.layers.1.edges.8.conv3.weight",
        "tams.layers.0.edges.5.conv5.weight",
        "tams.layers.1.edges.3.conv5.bias",
    ];
    let inputs: Vec<Tensor> = names
        .iter()
        .map(|n| params.get(n).cloned())
        .collect::<Result<_>>()?;
    let f = |xs: &[Tensor]| {
        let mut p = s.replaced(&names, xs);
        p.insert_frozen(ARCH, wrap(params.get(ARCH))?.clone());
        wrap(s.logits(&p, &ids))
    };
    let err = gradcheck::check(f, &inputs, 1e-6)?;
    assert!(err < 1e-6, "rel error {err}");
    Ok(())
}

#[test]
fn cell_gradient_wrt_soft_arch_matches_finite_differences() -> Result<()> {
    let s = setup(DType::F64, true)?;
    let ids = token_ids(1, 6, 32, 3)?;
    let f =
        |xs: &[Tensor]| wrap(with_arch(&s.params, xs[0].clone()).and_then(|p| s.logits(&p, &ids)));
    let err = gradcheck::check(f, &[s.soft_arch()?], 1e-6)?;
    assert!(err < 1e-6, "rel error {err}");
    Ok(())
}

#[test]
fn controller_gradient_through_soft_weights_matches_finite_differences() -> Result<()> {
    let s = setup(DType::F64, true)?;
    let ids = token_ids(1, 5, 32, 4)?;
    let emb = s.task_embedding()?;
    let names = [
        "tams.controller.fc1.weight",
        "tams.controller.fc1.bias",
        "tams.controller.fc2.weight",
        "tams.controller.fc2.bias",
    ];
    let inputs: Vec<Tensor> = names
        .iter()
        .map(|n| s.params.get(n).cloned())
        .collect::<Result<_>>()?;
    for gumbel in [None, Some(0.7)] {
        let controller = Controller::new(gumbel);
        let f = |xs: &[Tensor]| {
            let p = s.replaced(&names, xs);
            // The same noise at every evaluation: a fresh RNG from a fixed seed.
            let mut rng = StdRng::seed_from_u64(17);
            let arch = wrap(controller.arch_weights(&emb, &p, ArchMode::Soft, Some(&mut rng)))?;
            wrap(with_arch(&p, arch).and_then(|p| s.logits(&p, &ids)))
        };
        let err = gradcheck::check(f, &inputs, 1e-6)?;
        assert!(err < 1e-6, "gumbel {gumbel:?}: rel error {err}");
    }
    Ok(())
}

#[test]
fn gumbel_noise_is_seeded_and_only_with_an_rng() -> Result<()> {
    let s = setup(DType::F64, true)?;
    let emb = s.task_embedding()?;
    let c = Controller::new(Some(0.5));
    let run = |seed: Option<u64>| -> Result<Tensor> {
        let mut rng = seed.map(StdRng::seed_from_u64);
        c.arch_weights(&emb, &s.params, ArchMode::Soft, rng.as_mut())
    };
    assert_eq!(max_diff(&run(Some(1))?, &run(Some(1))?)?, 0.0);
    assert!(max_diff(&run(Some(1))?, &run(Some(2))?)? > 1e-3);
    let plain = Controller::new(None).arch_weights(&emb, &s.params, ArchMode::Soft, None)?;
    assert_eq!(max_diff(&run(None)?, &plain)?, 0.0);
    Ok(())
}

#[test]
fn straight_through_forward_is_the_one_hot_forward() -> Result<()> {
    let s = setup(DType::F64, true)?;
    let ids = token_ids(2, 6, 32, 5)?;
    let emb = s.task_embedding()?;
    let hard = s
        .controller
        .arch_weights(&emb, &s.params, ArchMode::Hard, None)?;
    let arch = Architecture::from_weights(&hard)?;
    let one_hot = arch.one_hot(DType::F64, &Device::Cpu)?;
    assert_eq!(
        max_diff(&hard, &one_hot)?,
        0.0,
        "hard weights are exactly one-hot"
    );
    let a = s.logits(&with_arch(&s.params, hard)?, &ids)?;
    let b = s.logits(&with_arch(&s.params, one_hot)?, &ids)?;
    assert_eq!(max_diff(&a, &b)?, 0.0);
    Ok(())
}

/// Under straight-through, d loss / d controller = (d loss / d arch at the one-hot arch) chained
/// through the soft weights. Both sides by autodiff; the soft path itself is checked against
/// finite differences above.
#[test]
fn straight_through_backward_is_the_soft_chain_rule() -> Result<()> {
    let s = setup(DType::F64, true)?;
    let ids = token_ids(2, 6, 32, 6)?;
    let loss = |params: &ParamStore| -> Result<Tensor> {
        let l = s.logits(params, &ids.narrow(1, 0, 5)?)?;
        Ok(crate::ops::cross_entropy(&l, &ids.narrow(1, 1, 5)?, -100)?)
    };
    let emb = s.task_embedding()?;
    let controller_vars: Vec<(String, Var)> = s
        .params
        .vars()
        .into_iter()
        .filter(|(n, _)| n.starts_with("tams.controller"))
        .collect();
    assert_eq!(controller_vars.len(), 4);

    let hard = s
        .controller
        .arch_weights(&emb, &s.params, ArchMode::Hard, None)?;
    let g_hard = loss(&with_arch(&s.params, hard.clone())?)?.backward()?;

    let fixed =
        Var::from_tensor(&Architecture::from_weights(&hard)?.one_hot(DType::F64, &Device::Cpu)?)?;
    let g_fixed = loss(&with_arch(&s.params, fixed.as_tensor().clone())?)?.backward()?;
    let d_arch = g_fixed
        .get(fixed.as_tensor())
        .expect("arch gradient")
        .detach();
    assert!(d_arch.abs()?.max_all()?.to_scalar::<f64>()? > 1e-6);
    // The gradient at the one-hot point needs every op's output, the unselected ones included:
    // finite differences make those weights non-zero, so they catch a forward that skips them.
    let f =
        |xs: &[Tensor]| wrap(with_arch(&s.params, xs[0].clone()).and_then(|p| s.logits(&p, &ids)));
    let err = gradcheck::check(f, &[fixed.as_tensor().detach()], 1e-6)?;
    assert!(
        err < 1e-6,
        "arch gradient at the one-hot point: rel error {err}"
    );

    let soft = s
        .controller
        .arch_weights(&emb, &s.params, ArchMode::Soft, None)?;
    let g_soft = (soft * &d_arch)?.sum_all()?.backward()?;
    for (name, v) in &controller_vars {
        let a = g_hard.get(v.as_tensor()).expect("hard gradient");
        let b = g_soft.get(v.as_tensor()).expect("soft gradient");
        let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(scale > 1e-8, "{name}: no gradient");
        let diff = max_diff(a, b)?;
        assert!(diff <= 1e-10 * scale.max(1.0), "{name}: {diff}");
    }
    // The cell's own parameters see the one-hot forward in both.
    let w = s.params.vars();
    let (_, v) = w
        .iter()
        .find(|(n, _)| n == "tams.layers.1.out.weight")
        .expect("out weight");
    let diff = max_diff(
        g_hard.get(v.as_tensor()).expect("hard"),
        g_fixed.get(v.as_tensor()).expect("fixed"),
    )?;
    assert!(diff < 1e-12, "{diff}");
    Ok(())
}

#[test]
fn skipping_zero_weight_ops_is_exact() -> Result<()> {
    let s = setup(DType::F64, true)?;
    let ids = token_ids(2, 6, 32, 7)?;
    let arch = Architecture {
        edges: [
            Op::Glu,
            Op::None,
            Op::Conv3Relu,
            Op::Identity,
            Op::LinearRelu,
            Op::Conv5Relu,
            Op::None,
            Op::Glu,
            Op::Identity,
        ],
    };
    let one_hot = arch.one_hot(DType::F64, &Device::Cpu)?;
    let skipping = s.logits(&with_arch(&s.params, one_hot.clone())?, &ids)?;
    // A Var carries a graph, so nothing is skipped.
    let tracked = Var::from_tensor(&one_hot)?;
    let full = s.logits(&with_arch(&s.params, tracked.as_tensor().clone())?, &ids)?;
    assert!(max_diff(&skipping, &full)? < 1e-12);
    Ok(())
}

#[test]
fn convolutions_are_causal() -> Result<()> {
    let s = setup(DType::F64, true)?;
    let arch = Architecture {
        edges: [Op::Conv5Relu; NUM_EDGES],
    };
    assert!(arch.uses_convolution());
    let params = with_arch(&s.params, arch.one_hot(DType::F64, &Device::Cpu)?)?;
    let mut v: Vec<u32> = token_ids(1, 8, 32, 8)?.flatten_all()?.to_vec1()?;
    let a = s.logits(
        &params,
        &Tensor::new(v.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
    )?;
    v[5] = (v[5] % 31) + 1;
    let b = s.logits(
        &params,
        &Tensor::new(v.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
    )?;
    assert!(max_diff(&a.narrow(1, 0, 5)?, &b.narrow(1, 0, 5)?)? < 1e-12);
    assert!(max_diff(&a.narrow(1, 5, 3)?, &b.narrow(1, 5, 3)?)? > 1e-6);
    // The cell alone mixes positions: with only the cell changing token 5's FFN input, positions
    // 5.. change and earlier ones do not.
    let x = gradcheck::randn_f64(&[1, 8, 16], 1, 1.0)?;
    let y = gradcheck::randn_f64(&[1, 8, 16], 2, 1.0)?;
    let cell = TamsCell::new(vec![0]);
    let before = cell.forward(0, &x, &y, &params)?;
    let bump = Tensor::zeros((1, 8, 16), DType::F64, &Device::Cpu)?.slice_assign(
        &[0..1, 5..6, 0..16],
        &Tensor::ones((1, 1, 16), DType::F64, &Device::Cpu)?,
    )?;
    let after = cell.forward(0, &(&x + bump)?, &y, &params)?;
    assert!(max_diff(&before.narrow(1, 0, 5)?, &after.narrow(1, 0, 5)?)? == 0.0);
    assert!(max_diff(&before.narrow(1, 6, 2)?, &after.narrow(1, 6, 2)?)? > 1e-6);
    Ok(())
}

#[test]
fn causal_conv_matches_candle_conv1d_on_left_padded_input() -> Result<()> {
    let x = gradcheck::randn_f64(&[2, 7, 3], 1, 1.0)?;
    let w = gradcheck::randn_f64(&[4, 3, 5], 2, 1.0)?;
    let b = gradcheck::randn_f64(&[4], 3, 1.0)?;
    let ours = cell::causal_conv1d(&x, &w, &b)?;
    let want = x
        .transpose(1, 2)?
        .pad_with_zeros(2, 4, 0)?
        .conv1d(&w, 0, 1, 1, 1)?
        .transpose(1, 2)?
        .broadcast_add(&b)?;
    assert!(max_diff(&ours, &want)? < 1e-12);
    let err = gradcheck::check(
        |t| wrap(cell::causal_conv1d(&t[0], &t[1], &t[2])),
        &[x, w, b],
        1e-6,
    )?;
    assert!(err < 1e-8, "rel error {err}");
    Ok(())
}

#[test]
fn centred_conv_matches_candle_conv1d_with_same_padding() -> Result<()> {
    let x = gradcheck::randn_f64(&[2, 7, 3], 4, 1.0)?;
    for k in [3usize, 5] {
        let w = gradcheck::randn_f64(&[4, 3, k], 5, 1.0)?;
        let b = gradcheck::randn_f64(&[4], 6, 1.0)?;
        let ours = cell::conv1d(&x, &w, &b, false)?;
        let want = x
            .transpose(1, 2)?
            .conv1d(&w, (k - 1) / 2, 1, 1, 1)?
            .transpose(1, 2)?
            .broadcast_add(&b)?;
        assert!(max_diff(&ours, &want)? < 1e-12, "k {k}");
        // Position 2 now sees position 3: changing x[3] changes y[2].
        let mut v: Vec<f64> = x.flatten_all()?.to_vec1()?;
        v[3 * 3] += 1.0;
        let x2 = Tensor::from_vec(v, x.dims(), &Device::Cpu)?;
        let y2 = cell::conv1d(&x2, &w, &b, false)?;
        assert!(max_diff(&ours.narrow(1, 2, 1)?, &y2.narrow(1, 2, 1)?)? > 1e-6);
        let err = gradcheck::check(
            |t| wrap(cell::conv1d(&t[0], &t[1], &t[2], false)),
            &[x.clone(), w, b],
            1e-6,
        )?;
        assert!(err < 1e-8, "k {k}: rel error {err}");
    }
    Ok(())
}

#[test]
fn encoders_get_a_bidirectional_cell_and_decoders_a_causal_one() -> Result<()> {
    use crate::model::testing::{tiny_bert_config, tiny_llama_config};
    use crate::model::Arch;
    use crate::peft::config::ModelDims;
    let tc = TamsConfig {
        reduced_dim: 8,
        controller_hidden: 8,
        ..TamsConfig::default()
    };
    for (arch, causal) in [
        (Arch::Llama(tiny_llama_config()), true),
        (Arch::Bert(tiny_bert_config()), false),
    ] {
        let dims = ModelDims::of(&arch);
        let base = match &arch {
            Arch::Llama(c) => crate::model::testing::random_params(
                &crate::model::Llama::expected_params(c),
                1,
                DType::F32,
            )?,
            Arch::Bert(c) => crate::model::testing::random_params(
                &crate::model::Bert::expected_params(c),
                1,
                DType::F32,
            )?,
        };
        let params = tc.init(dims, &base, 2)?;
        let (cell, _) = tc.build(dims, &params)?;
        assert_eq!(cell.is_causal(), causal);
    }
    Ok(())
}

#[test]
fn decoding_recomputes_when_a_delta_mixes_positions() -> Result<()> {
    let s = setup(DType::F32, true)?;
    let arch = Architecture {
        edges: [Op::Conv3Relu; NUM_EDGES],
    };
    let params = with_arch(&s.params, arch.one_hot(DType::F32, &Device::Cpu)?)?;
    assert!(s.deltas.mixes_positions());
    let mut ids: Vec<u32> = vec![3, 9, 4, 17];
    let mut dec = Decoder::new(&s.model, &s.base, &s.deltas, &params);
    let mut input = ids.clone();
    for _ in 0..4 {
        let got = dec.next_logits(&input)?;
        let full = s.logits(
            &params,
            &Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?,
        )?;
        let want: Vec<f32> = full.get(0)?.get(ids.len() - 1)?.to_vec1()?;
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-5, "{diff}");
        let next = crate::generate::argmax(&got);
        ids.push(next);
        input = vec![next];
    }
    // Extending a KV cache would be silently wrong: it is refused.
    let mut cache = KvCache::new(s.model.cfg.num_hidden_layers);
    let t = |v: &[u32]| Tensor::new(v, &Device::Cpu)?.unsqueeze(0);
    s.model
        .forward_last(&s.base, &s.deltas, &params, &t(&ids[..4])?, &mut cache)?;
    let err = s
        .model
        .forward_last(&s.base, &s.deltas, &params, &t(&ids[4..5])?, &mut cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mixes sequence positions"), "{err}");
    Ok(())
}

#[test]
fn task_embedding_is_the_masked_mean_and_detached() -> Result<()> {
    let (_, base) = tiny_llama(2, DType::F64)?;
    let ids = Tensor::new(&[[3u32, 5, 0], [7, 0, 0]], &Device::Cpu)?;
    let mask = Tensor::new(&[[1u32, 1, 0], [1, 0, 0]], &Device::Cpu)?;
    let got = task_embedding(&base, &ids, Some(&mask))?;
    let e = base.get("model.embed_tokens.weight")?;
    let want = ((e.get(3)? + e.get(5)?)? + e.get(7)?)?.affine(1.0 / 3.0, 0.0)?;
    assert!(max_diff(&got, &want)? < 1e-12);
    assert!(!got.track_op());
    let all_pad = Tensor::zeros((2, 3), DType::U32, &Device::Cpu)?;
    let err = task_embedding(&base, &ids, Some(&all_pad))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no (non-pad) tokens"), "{err}");
    // BERT stores its word embeddings under another name.
    let (_, bert) = tiny_bert(2, DType::F32)?;
    assert_eq!(task_embedding(&bert, &ids, None)?.dims(), &[16]);
    Ok(())
}

#[test]
fn architecture_json_round_trip_and_display() -> Result<()> {
    let arch = Architecture {
        edges: [
            Op::Glu,
            Op::None,
            Op::Identity,
            Op::LinearRelu,
            Op::Conv3Relu,
            Op::Conv5Relu,
            Op::None,
            Op::Glu,
            Op::Identity,
        ],
    };
    assert_eq!(
        arch.to_string(),
        "node2 <- 0:glu, 1:none | node3 <- 0:identity, 1:linear_relu, 2:conv3_relu | \
         node4 <- 0:conv5_relu, 1:none, 2:glu, 3:identity"
    );
    let json = serde_json::to_string(&arch).expect("serialise");
    assert!(json.contains("\"conv5_relu\""), "{json}");
    let back: Architecture = serde_json::from_str(&json).expect("deserialise");
    assert_eq!(back, arch);
    let t = arch.one_hot(DType::F32, &Device::Cpu)?;
    assert_eq!(Architecture::from_weights(&t)?, arch);
    assert!(serde_json::from_str::<Architecture>(r#"{"edges": ["glu"]}"#).is_err());
    assert!(serde_json::from_str::<Architecture>(
        r#"{"edges": ["glu","glu","glu","glu","glu","glu","glu","glu","conv7"]}"#
    )
    .is_err());

    let dir = std::env::temp_dir().join(format!("metapeft-tams-{}", std::process::id()));
    let mut archs = BTreeMap::new();
    archs.insert("banking77".to_string(), arch);
    archs.insert(
        "snips".to_string(),
        Architecture {
            edges: [Op::Identity; NUM_EDGES],
        },
    );
    write_architectures(&dir, &archs)?;
    assert_eq!(read_architectures(&dir)?, archs);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn bad_inputs_give_clear_errors() -> Result<()> {
    let s = setup(DType::F32, false)?;
    let ids = token_ids(1, 4, 32, 1)?;
    let err_of = |r: Result<Tensor>| r.unwrap_err().to_string();
    let build_err = |p: &ParamStore| match config().build(s.dims, p) {
        Ok(_) => panic!("a bad store was accepted"),
        Err(e) => e.to_string(),
    };

    let wrong = Tensor::zeros((9, 5), DType::F32, &Device::Cpu)?;
    let e = with_arch(&s.params, wrong.clone()).unwrap_err().to_string();
    assert!(e.contains("must be [9, 6]"), "{e}");
    let e = Architecture::from_weights(&wrong).unwrap_err().to_string();
    assert!(e.contains("must be [9, 6]"), "{e}");
    let mut p = s.params.clone();
    p.insert_frozen(ARCH, wrong);
    let e = err_of(s.logits(&p, &ids));
    assert!(e.contains("`tams.arch` must be [9, 6], got [9, 5]"), "{e}");
    let e = build_err(&p);
    assert!(e.contains("`tams.arch` has shape [9, 5]"), "{e}");

    let e = err_of(s.logits(&s.params, &ids));
    assert!(e.contains("no architecture `tams.arch`"), "{e}");

    let mut missing = ParamStore::new();
    for (n, t) in s.params.iter() {
        if n != "tams.layers.1.edges.3.glu.bias" {
            missing.insert_frozen(n, t.tensor().clone());
        }
    }
    let e = build_err(&missing);
    assert!(
        e.contains("missing tensor `tams.layers.1.edges.3.glu.bias`"),
        "{e}"
    );

    let mut bad = s.params.clone();
    bad.insert_frozen(
        "tams.controller.fc1.weight",
        Tensor::zeros((8, 15), DType::F32, &Device::Cpu)?,
    );
    let e = build_err(&bad);
    assert!(
        e.contains("`tams.controller.fc1.weight` has shape [8, 15], expected [8, 16]"),
        "{e}"
    );

    let mut extra = s.params.clone();
    extra.insert_frozen(
        "tams.layers.7.out.weight",
        Tensor::zeros(2, DType::F32, &Device::Cpu)?,
    );
    let e = build_err(&extra);
    assert!(
        e.contains("unexpected tensor `tams.layers.7.out.weight`"),
        "{e}"
    );

    let only_five = TamsConfig {
        layers: Some(vec![5]),
        ..config()
    };
    let e = only_five.expected(s.dims).unwrap_err().to_string();
    assert!(e.contains("layer 5 does not exist"), "{e}");

    let e = s
        .controller
        .logits(&Tensor::zeros(8, DType::F32, &Device::Cpu)?, &s.params)
        .unwrap_err()
        .to_string();
    assert!(e.contains("task embedding must be [16]"), "{e}");
    Ok(())
}

#[test]
fn config_defaults_and_selected_layers() -> Result<()> {
    let c: TamsConfig = serde_json::from_str("{}").expect("defaults");
    assert_eq!(c, TamsConfig::default());
    assert_eq!(
        (c.reduced_dim, c.controller_hidden, c.hard),
        (64, 128, true)
    );
    let s = setup(DType::F32, true)?;
    let one = TamsConfig {
        layers: Some(vec![1]),
        ..config()
    };
    let p = one.init(s.dims, &s.base, 1)?;
    assert!(p.contains("tams.layers.1.out.weight") && !p.contains("tams.layers.0.out.weight"));
    let (cell, _) = one.build(s.dims, &p)?;
    assert_eq!(cell.layers(), &[1]);
    Ok(())
}
