//! The MAML family as meta-gradient functions of one episode.
//!
//! Every function adapts the "fast" parameters on the support set (plain SGD, as in MAML) and
//! returns the gradient of the query loss with respect to the meta-variables the caller lists:
//! the fast parameters' initial values (the entries of `init` that are `Var`s), and any other
//! `Var` the losses reach (base weights being primed, a TAMS controller whose architecture
//! tensor sits in `init` as a graph-carrying frozen entry, ...). Nothing is updated here: the
//! meta-trainer averages the returned gradients over a meta-batch and takes the outer step.
//!
//! - [`first_order`]: FOMAML (and ANIL, MLtD, priming, which differ only in what is adapted and
//!   what is a meta-variable); optional learned per-parameter inner rates (Meta-SGD);
//! - [`reptile`]: the direction `theta - theta_K`;
//! - [`exact`]: second-order MAML by differentiating through the inner loop, on a dedicated
//!   thread where candle keeps the graph of gradients (`CANDLE_GRAD_DO_NOT_DETACH`);
//! - [`hessian_free`]: the same meta-gradient with Hessian-vector products taken as central
//!   differences of gradients, at first-order memory cost.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use crate::params::{Param, ParamStore};
use crate::{Error, Result};

/// The two losses of one episode as functions of the parameters. Implementations hold the
/// model, its deltas and the episode's data; `step` picks the support batch of inner step `step`.
pub trait EpisodeLoss: Sync {
    fn support(&self, base: &ParamStore, fast: &ParamStore, step: usize) -> Result<Tensor>;
    fn query(&self, base: &ParamStore, fast: &ParamStore) -> Result<Tensor>;
}

/// The inner loop: `steps` SGD steps of rate `lr` on the entries `adapted` selects.
#[derive(Clone, Copy)]
pub struct InnerLoop<'a> {
    pub steps: usize,
    pub lr: f64,
    pub adapted: &'a (dyn Fn(&str) -> bool + Sync),
    /// Meta-SGD: a learned rate per adapted entry (`Var`s named like the entries); replaces `lr`.
    pub learned_lrs: Option<&'a ParamStore>,
}

/// What one episode gives the outer loop.
#[derive(Debug)]
pub struct EpisodeGrads {
    /// Aligned with the caller's meta-variables; `None` where the losses do not reach one.
    pub grads: Vec<Option<Tensor>>,
    /// Support loss before the first and after the last inner step (the latter measured at the
    /// last step's batch before its update).
    pub support_losses: Vec<f64>,
    /// Query loss at the adapted parameters.
    pub query_loss: f64,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.detach().to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

fn check_finite(what: &str, v: f64) -> Result<f64> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Error::invalid(format!(
            "{what} is {v}: lower the inner or outer learning rate"
        )))
    }
}

/// Adapted entries as fresh leaf `Var`s holding `values`' tensors; the others taken from `rest`.
fn with_fresh_vars(
    values: &ParamStore,
    rest: &ParamStore,
    adapted: &dyn Fn(&str) -> bool,
) -> Result<(ParamStore, Vec<(String, Var)>)> {
    let mut store = ParamStore::new();
    let mut vars = vec![];
    for (name, p) in rest.iter() {
        if adapted(name) {
            let v = Var::from_tensor(&values.get(name)?.detach())?;
            vars.push((name.to_string(), v.clone()));
            store.insert_trainable(name, v);
        } else {
            store.insert(name, p.clone());
        }
    }
    Ok((store, vars))
}

/// Meta-SGD's rate for `name`; entries without one (an N-way episode's fresh head, whose
/// shape follows the episode) take the scalar rate.
fn inner_rate(inner: &InnerLoop, name: &str) -> Result<Option<Tensor>> {
    match inner.learned_lrs {
        Some(l) if l.contains(name) => Ok(Some(l.get(name)?.detach())),
        _ => Ok(None),
    }
}

/// `theta - rate * g` with a scalar or per-element rate.
fn sgd(theta: &Tensor, g: &Tensor, lr: f64, rate: Option<&Tensor>) -> Result<Tensor> {
    Ok(match rate {
        Some(r) => (theta - (g * r)?)?,
        None => (theta - (g * lr)?)?,
    })
}

/// The first-order inner loop: the trajectory `theta_0 .. theta_K` (detached values of every
/// entry), each step's gradients of the adapted entries, and the support losses.
struct Trajectory {
    points: Vec<ParamStore>,
    grads: Vec<HashMap<String, Tensor>>,
    losses: Vec<f64>,
}

fn adapt(
    task: &dyn EpisodeLoss,
    base: &ParamStore,
    init: &ParamStore,
    inner: &InnerLoop,
) -> Result<Trajectory> {
    let frozen_base = base.detached();
    let mut cur = init.detached();
    let mut tr = Trajectory {
        points: vec![cur.clone()],
        grads: vec![],
        losses: vec![],
    };
    for k in 0..inner.steps {
        let (store, vars) = with_fresh_vars(&cur, &cur, inner.adapted)?;
        let loss = task.support(&frozen_base, &store, k)?;
        tr.losses
            .push(check_finite("the support loss", scalar(&loss)?)?);
        let g = crate::ops::backward(&loss)?;
        let mut next = cur.clone();
        let mut gk = HashMap::new();
        for (name, v) in &vars {
            let gv = match g.get(v.as_tensor()) {
                Some(t) => t.detach(),
                None => v.zeros_like()?,
            };
            let rate = inner_rate(inner, name)?;
            next.insert_frozen(
                name.clone(),
                sgd(v.as_tensor(), &gv, inner.lr, rate.as_ref())?,
            );
            gk.insert(name.clone(), gv);
        }
        tr.grads.push(gk);
        cur = next;
        tr.points.push(cur.clone());
    }
    Ok(tr)
}

/// The adapted parameters after the inner loop (detached), and the support losses.
pub fn adapted(
    task: &dyn EpisodeLoss,
    base: &ParamStore,
    init: &ParamStore,
    inner: &InnerLoop,
) -> Result<(ParamStore, Vec<f64>)> {
    let mut tr = adapt(task, base, init, inner)?;
    let last = tr.points.pop().expect("trajectory starts with theta_0");
    Ok((last, tr.losses))
}

fn collect(grads: &GradStore, meta_vars: &[(String, Var)]) -> Vec<Option<Tensor>> {
    meta_vars
        .iter()
        .map(|(_, v)| grads.get(v.as_tensor()).map(Tensor::detach))
        .collect()
}

/// The `Var` behind `init`'s entry `name`, if it is a meta-variable.
fn init_var<'a>(init: &'a ParamStore, name: &str) -> Option<&'a Var> {
    match init.param(name) {
        Some(Param::Trainable(v)) => Some(v),
        _ => None,
    }
}

/// Query loss at `adapted` values (adapted entries as fresh `Var`s, the rest from `init` with
/// their graphs) and its gradients; the fresh `Var`s' gradients are credited to `init`'s.
fn query_grads(
    task: &dyn EpisodeLoss,
    base: &ParamStore,
    init: &ParamStore,
    adapted: &ParamStore,
    inner: &InnerLoop,
) -> Result<(f64, GradStore, HashMap<String, Tensor>)> {
    let (store, vars) = with_fresh_vars(adapted, init, inner.adapted)?;
    let loss = task.query(base, &store)?;
    let q = check_finite("the query loss", scalar(&loss)?)?;
    let mut g = crate::ops::backward(&loss)?;
    let mut fast = HashMap::new();
    for (name, v) in &vars {
        let gv = match g.remove(v.as_tensor()) {
            Some(t) => t,
            None => v.zeros_like()?,
        };
        if let Some(iv) = init_var(init, name) {
            g.insert(iv.as_tensor(), gv.clone());
        }
        fast.insert(name.clone(), gv);
    }
    Ok((q, g, fast))
}

/// First-order MAML: the query gradient at the adapted parameters stands for the meta-gradient.
/// With learned rates (Meta-SGD), their gradient is `-sum_k g_k * dLq/dtheta_K` (first order).
pub fn first_order(
    task: &dyn EpisodeLoss,
    base: &ParamStore,
    init: &ParamStore,
    inner: &InnerLoop,
    meta_vars: &[(String, Var)],
) -> Result<EpisodeGrads> {
    let tr = adapt(task, base, init, inner)?;
    let last = tr.points.last().expect("trajectory starts with theta_0");
    let (q, mut g, fast) = query_grads(task, base, init, last, inner)?;
    if let Some(lrs) = inner.learned_lrs {
        for (name, v) in lrs.vars() {
            let Some(dq) = fast.get(&name) else { continue };
            let mut acc = v.zeros_like()?;
            for gk in &tr.grads {
                if let Some(x) = gk.get(&name) {
                    acc = (acc - (x * dq)?)?;
                }
            }
            g.insert(v.as_tensor(), acc);
        }
    }
    Ok(EpisodeGrads {
        grads: collect(&g, meta_vars),
        support_losses: tr.losses,
        query_loss: q,
    })
}

/// Reptile: the "gradient" `theta_0 - theta_K` of the adapted entries (an outer SGD step of rate
/// eps moves the init eps of the way to the adapted weights). The query loss is only measured.
pub fn reptile(
    task: &dyn EpisodeLoss,
    base: &ParamStore,
    init: &ParamStore,
    inner: &InnerLoop,
    meta_vars: &[(String, Var)],
) -> Result<EpisodeGrads> {
    let tr = adapt(task, base, init, inner)?;
    let last = tr.points.last().expect("trajectory starts with theta_0");
    let q = scalar(&task.query(&base.detached(), last)?)?;
    let mut grads = vec![None; meta_vars.len()];
    for (name, p) in init.iter() {
        if let (true, Param::Trainable(v)) = ((inner.adapted)(name), p) {
            if let Some(i) = meta_vars
                .iter()
                .position(|(_, m)| m.as_tensor().id() == v.as_tensor().id())
            {
                grads[i] = Some((v.as_tensor().detach() - last.get(name)?)?);
            }
        }
    }
    Ok(EpisodeGrads {
        grads,
        support_losses: tr.losses,
        query_loss: check_finite("the query loss", q)?,
    })
}

/// Exact second-order MAML: differentiate the query loss through every inner step. Runs on a
/// dedicated thread on which candle keeps the graph of gradients; memory grows with the steps.
pub fn exact(
    task: &dyn EpisodeLoss,
    base: &ParamStore,
    init: &ParamStore,
    inner: &InnerLoop,
    meta_vars: &[(String, Var)],
) -> Result<EpisodeGrads> {
    if inner.learned_lrs.is_some() {
        return Err(Error::invalid(
            "learned inner rates (Meta-SGD) are first-order only here: use the first-order algorithm",
        ));
    }
    super::second_order::on_graph_thread(|| exact_here(task, base, init, inner, meta_vars))
}

fn exact_here(
    task: &dyn EpisodeLoss,
    base: &ParamStore,
    init: &ParamStore,
    inner: &InnerLoop,
    meta_vars: &[(String, Var)],
) -> Result<EpisodeGrads> {
    // Fast weights are functions of the meta-variables. Gradients exist only for leaf `Var`s, so
    // each step reads the support gradient from a zero "probe" added to each adapted entry.
    let mut cur = init.clone();
    let mut losses = vec![];
    for k in 0..inner.steps {
        let mut store = ParamStore::new();
        let mut probes = vec![];
        for (name, p) in cur.iter() {
            if (inner.adapted)(name) {
                let z = Var::zeros(p.tensor().shape(), p.tensor().dtype(), p.tensor().device())?;
                store.insert_frozen(name, (p.tensor() + z.as_tensor())?);
                probes.push((name.to_string(), z));
            } else {
                store.insert(name, p.clone());
            }
        }
        let loss = task.support(base, &store, k)?;
        losses.push(check_finite("the support loss", scalar(&loss)?)?);
        let g = crate::ops::backward(&loss)?;
        let mut next = ParamStore::new();
        for (name, p) in store.iter() {
            match probes.iter().find(|(n, _)| n == name) {
                Some((_, z)) => {
                    let t = p.tensor();
                    let upd = match g.get(z.as_tensor()) {
                        Some(gz) => (t - (gz * inner.lr)?)?,
                        None => t.clone(),
                    };
                    next.insert_frozen(name, upd);
                }
                None => next.insert(name, p.clone()),
            }
        }
        cur = next;
    }
    let loss = task.query(base, &cur)?;
    let q = check_finite("the query loss", scalar(&loss)?)?;
    let g = super::second_order::backward_detached(&loss)?;
    Ok(EpisodeGrads {
        grads: collect(&g, meta_vars),
        support_losses: losses,
        query_loss: q,
    })
}

/// Gradients of the adapted entries, by name.
type FastGrads = HashMap<String, Tensor>;

fn norm(ts: &FastGrads) -> Result<f64> {
    let mut s = 0.0;
    for t in ts.values() {
        s += scalar(&t.sqr()?.sum_all()?)?;
    }
    Ok(s.sqrt())
}

/// Second-order MAML without second-order graphs: walk the trajectory backwards,
/// `v <- v - lr * H_k v`, with `H_k v ~ (g(theta_k + e v) - g(theta_k - e v)) / 2e` (two extra
/// gradients per inner step). `eps` is the step length along the unit direction `v / |v|`.
pub fn hessian_free(
    task: &dyn EpisodeLoss,
    base: &ParamStore,
    init: &ParamStore,
    inner: &InnerLoop,
    meta_vars: &[(String, Var)],
    eps: f64,
) -> Result<EpisodeGrads> {
    if inner.learned_lrs.is_some() {
        return Err(Error::invalid(
            "learned inner rates (Meta-SGD) are first-order only here: use the first-order algorithm",
        ));
    }
    let tr = adapt(task, base, init, inner)?;
    let last = tr.points.last().expect("trajectory starts with theta_0");
    let (q, g, mut v) = query_grads(task, base, init, last, inner)?;
    // Direct gradients of meta-variables that are not adapted (base, controller, ANIL's body);
    // the adapted entries' initial values get `v` at the end.
    let mut out = collect(&g, meta_vars);
    for k in (0..inner.steps).rev() {
        let vn = norm(&v)?;
        if vn == 0.0 {
            break;
        }
        let e = eps / vn;
        let grad_at = |sign: f64| -> Result<(FastGrads, Vec<Option<Tensor>>)> {
            let mut moved = ParamStore::new();
            for (name, p) in tr.points[k].iter() {
                let t = match v.get(name) {
                    Some(d) => (p.tensor() + (d * (sign * e))?)?,
                    None => p.tensor().clone(),
                };
                moved.insert_frozen(name, t);
            }
            let (store, vars) = with_fresh_vars(&moved, init, inner.adapted)?;
            let loss = task.support(base, &store, k)?;
            let g = crate::ops::backward(&loss)?;
            let mut fast = HashMap::new();
            for (name, var) in &vars {
                let gv = match g.get(var.as_tensor()) {
                    Some(t) => t.detach(),
                    None => var.zeros_like()?,
                };
                fast.insert(name.clone(), gv);
            }
            Ok((fast, collect(&g, meta_vars)))
        };
        let (fp, mp) = grad_at(1.0)?;
        let (fm, mm) = grad_at(-1.0)?;
        let scale = inner.lr / (2.0 * e);
        for (name, vt) in v.iter_mut() {
            let hv = (&fp[name] - &fm[name])?;
            *vt = (&*vt - (hv * scale)?)?;
        }
        // The cross terms: how the inner step moved with every other meta-variable.
        for (i, o) in out.iter_mut().enumerate() {
            if let (Some(a), Some(b)) = (&mp[i], &mm[i]) {
                let d = ((a - b)? * scale)?;
                *o = Some(match o.take() {
                    Some(x) => (x - d)?,
                    None => d.neg()?,
                });
            }
        }
    }
    for (i, (_, mv)) in meta_vars.iter().enumerate() {
        for (name, p) in init.iter() {
            if let Param::Trainable(x) = p {
                if x.as_tensor().id() == mv.as_tensor().id() && (inner.adapted)(name) {
                    out[i] = v.get(name).cloned();
                }
            }
        }
    }
    Ok(EpisodeGrads {
        grads: out,
        support_losses: tr.losses,
        query_loss: q,
    })
}
