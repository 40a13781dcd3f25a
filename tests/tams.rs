//! TAMS on SmolLM2-135M: a fresh cell leaves the model unchanged, generation with convolution ops
//! works (recomputing the sequence), and a forward-cost measurement (ignored; a command, not an
//! assertion on time).

mod common;

use candle_core::{DType, Device, Tensor};
use metapeft::generate::{generate, GenerateOptions};
use metapeft::meta::tams::{
    task_embedding, with_arch, ArchMode, Architecture, Op, TamsConfig, NUM_EDGES,
};
use metapeft::model::{Arch, Llama};
use metapeft::params::ParamStore;
use metapeft::peft::config::ModelDims;
use metapeft::peft::DeltaSet;

fn setup() -> (
    Llama,
    ModelDims,
    ParamStore,
    DeltaSet,
    metapeft::meta::tams::Controller,
) {
    let ck = common::smollm2();
    let Arch::Llama(cfg) = &ck.arch else {
        panic!("not a decoder")
    };
    let model = Llama::new(cfg.clone(), &Device::Cpu).unwrap();
    let dims = ModelDims::of(&ck.arch);
    let cfg = TamsConfig::default();
    let params = cfg.init(dims, &ck.params, 3).unwrap();
    let (cell, controller) = cfg.build(dims, &params).unwrap();
    let mut deltas = DeltaSet::none();
    deltas.push(cell);
    (model, dims, params, deltas, controller)
}

fn ids(text: &str) -> Vec<u32> {
    common::smollm2().tokenizer.encode(text, false).unwrap()
}

#[test]
fn fresh_tams_leaves_smollm2_unchanged() {
    let ck = common::smollm2();
    let (model, _, params, deltas, controller) = setup();
    let support = Tensor::new(
        ids("Translate to French: good morning").as_slice(),
        &Device::Cpu,
    )
    .unwrap()
    .unsqueeze(0)
    .unwrap();
    let emb = task_embedding(&ck.params, &support, None).unwrap();
    let hard = controller
        .arch_weights(&emb, &params, ArchMode::Hard, None)
        .unwrap();
    let arch = Architecture::from_weights(&hard).unwrap();
    println!("architecture: {arch}");
    let p = with_arch(&params, hard).unwrap();
    let x = Tensor::new(ids("The capital of France is").as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let plain = model
        .forward(&ck.params, &DeltaSet::none(), &ParamStore::new(), &x, None)
        .unwrap();
    let got = model.forward(&ck.params, &deltas, &p, &x, None).unwrap();
    let diff = (got - plain)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    // The plain model runs each sublayer as one fused op, the TAMS one composes its MLP (the
    // cell hooks into it), so the two agree to f32 rounding only; a fresh cell that added
    // anything would move the logits by orders of magnitude more.
    assert!(
        diff < 2e-4,
        "a fresh TAMS cell changed the logits by {diff}"
    );

    // With convolutions selected, generation recomputes the sequence and matches the base model
    // (the fresh cell adds zero).
    let conv = Architecture {
        edges: [Op::Conv3Relu; NUM_EDGES],
    };
    let p = with_arch(&params, conv.one_hot(DType::F32, &Device::Cpu).unwrap()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 4,
        stop_at_eos: false,
        ..Default::default()
    };
    let prompt = ids("The capital of France is");
    let a = generate(
        &model,
        &ck.params,
        &deltas,
        &p,
        &ck.tokenizer,
        &prompt,
        &opts,
        |_| {},
    )
    .unwrap();
    let b = generate(
        &model,
        &ck.params,
        &DeltaSet::none(),
        &ParamStore::new(),
        &ck.tokenizer,
        &prompt,
        &opts,
        |_| {},
    )
    .unwrap();
    assert_eq!(a.generated_ids, b.generated_ids);
}
