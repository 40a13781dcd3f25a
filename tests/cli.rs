//! The command line as a user runs it: JSON outputs, --chat, help texts, assets.

mod common;

use common::metapeft;

#[test]
fn generate_chat_json_with_logprobs() {
    let (code, out, err) = metapeft(&[
        "generate",
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--logprobs",
        "2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON on stdout");
    assert_eq!(v["text"], "The capital of France is Paris.");
    let gen = v["generated_ids"].as_array().unwrap();
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(gen.len(), steps.len());
    assert_eq!(gen.last().unwrap(), 2, "stops at EOS <|im_end|>");
    assert_eq!(steps[0]["ids"].as_array().unwrap().len(), 2);
    assert_eq!(steps[0]["logprobs"].as_array().unwrap().len(), 2);
    assert!(
        v["prompt_ids"].as_array().unwrap().len() > 30,
        "ChatML with the default system prompt"
    );
}

#[test]
fn generate_verbatim_prompt_adds_no_bos() {
    let (code, out, err) = metapeft(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "3",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ids: Vec<u64> = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let fx = common::fixture("smollm2_greedy.json");
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"] == "The capital of France is")
        .unwrap();
    let want: Vec<u64> = case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids, want);
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 3);
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn embed_json() {
    let (code, out, err) = metapeft(&[
        "embed",
        "--json",
        "A man is eating food.",
        "A man is eating a piece of bread.",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let e = v["embeddings"].as_array().unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].as_array().unwrap().len(), 384);
}

#[test]
fn info_json_summary() {
    let (code, out, err) = metapeft(&["info", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["layers"], 30);
    assert_eq!(v["vocab_size"], 49152);
    assert_eq!(v["parameters"], 134_515_008);
    assert!(v["storage"].as_str().unwrap().contains("Q4_1"));
}

#[test]
fn wrong_model_kind_and_bad_options_fail_cleanly() {
    let minilm = common::minilm_path();
    let (code, _, err) = metapeft(&[
        "generate",
        "--model",
        &minilm.to_string_lossy(),
        "--prompt",
        "hi",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("encoder"), "{err}");
    let (code, _, err) = metapeft(&[
        "generate",
        "--prompt",
        "hi",
        "--top-p",
        "1.5",
        "--temperature",
        "1",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("top-p"), "{err}");
    let (code, _, err) = metapeft(&["generate", "--prompt", "hi", "--system", "x"]);
    assert_eq!(code, 2, "clap rejects --system without --chat: {err}");
}

#[test]
fn help_teaches_and_assets_verify() {
    let (code, out, _) = metapeft(&["generate", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--logprobs") && out.contains("Examples"),
        "{out}"
    );
    let (code, out, err) = metapeft(&["assets", "verify"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("smollm2") && out.contains("match the wheel's RECORD"),
        "{out}"
    );
}

#[test]
fn generate_with_a_peft_adapter_matches_peft() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft/lora_qv_down");
    let (code, out, err) = metapeft(&[
        "generate",
        "--adapter",
        &dir.to_string_lossy(),
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let fx = common::fixture("peft/expected.json");
    let case = fx["adapters"]["lora_qv_down"]["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"] == "The capital of France is")
        .unwrap()
        .clone();
    let want: Vec<u64> = case["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let got: Vec<u64> = v["generated_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    // generate stops at EOS; PEFT's reference ran the full 12 steps.
    assert!(
        !got.is_empty() && want.starts_with(&got),
        "ours {got:?} vs PEFT {want:?}"
    );
}
