//! Tokenizers from `tokenizer.json` or GGUF metadata, plus chat templates.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{PreTokenizerWrapper, Tokenizer};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// The chat formats metapeft can render (Jinja is not interpreted; the template is recognised).
#[derive(Clone, Debug, PartialEq)]
pub enum ChatFormat {
    /// `<|im_start|>{role}\n{content}<|im_end|>\n`, with an optional default system message that
    /// the template inserts when the conversation has none.
    ChatMl { default_system: Option<String> },
}

#[derive(Clone, Debug)]
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub pad_id: Option<u32>,
    /// Whether the tokenizer's config asks for a BOS token in front of every encoded text.
    pub add_bos: bool,
    /// The chat template as stored in the checkpoint (Jinja source).
    pub chat_template: Option<String>,
}

impl TextTokenizer {
    /// From GGUF metadata: byte-level BPE with merges, special tokens, BOS/EOS and the template.
    pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Self> {
        let mut inner =
            Tokenizer::from_gguf(ct).map_err(|e| Error::file(path, format!("tokenizer: {e}")))?;
        let meta = |k: &str| ct.metadata.get(k);
        let pre = meta("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned();
        let add_space = meta("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        // candle maps unknown `pre` names to a GPT-2 byte-level pre-tokenizer that adds a prefix
        // space; llama.cpp's `smollm`/`gpt2` variants split like this instead.
        match pre.as_deref() {
            Some("smollm") => {
                let seq = Sequence::new(vec![
                    PreTokenizerWrapper::Digits(Digits::new(true)),
                    PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
                ]);
                inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(seq)));
                inner.with_decoder(Some(ByteLevelDecoder::default()));
            }
            Some("qwen2") | Some("llama3") | Some("smaug-bpe") | Some("lfm2") => {}
            _ => {
                inner.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
                    add_space, true, true,
                ))));
                inner.with_decoder(Some(ByteLevelDecoder::default()));
            }
        }
        let id = |k: &str| meta(k).and_then(|v| v.to_u32().ok());
        Ok(Self {
            inner,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            pad_id: id("tokenizer.ggml.padding_token_id"),
            add_bos: meta("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false),
            chat_template: meta("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
        })
    }

    /// From a Hugging Face directory: `tokenizer.json`, and `tokenizer_config.json` when present.
    pub fn from_hf_dir(
        dir: &Path,
        eos_from_config: &[u32],
        bos_from_config: Option<u32>,
    ) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(Error::file(
                dir,
                "missing tokenizer.json (metapeft needs the fast tokenizer file)",
            ));
        }
        let mut inner = Tokenizer::from_file(&tj).map_err(|e| Error::file(&tj, e))?;
        // Batching pads by itself; the file's fixed padding would only add masked tokens.
        inner.with_padding(None);
        // sentence-transformers models truncate at `max_seq_length` (all-MiniLM-L6-v2: 256, while
        // its tokenizer.json says 128); without that file the tokenizer's own truncation stands.
        let st_cfg = dir.join("sentence_bert_config.json");
        if let Ok(text) = std::fs::read_to_string(&st_cfg) {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::file(&st_cfg, e))?;
            if let Some(max) = v.get("max_seq_length").and_then(|m| m.as_u64()) {
                inner
                    .with_truncation(Some(tokenizers::TruncationParams {
                        max_length: max as usize,
                        ..Default::default()
                    }))
                    .map_err(|e| Error::file(&st_cfg, e))?;
            }
        }
        let cfg: serde_json::Value =
            match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
                Ok(s) => serde_json::from_str(&s)
                    .map_err(|e| Error::file(dir.join("tokenizer_config.json"), e))?,
                Err(_) => serde_json::Value::Null,
            };
        let tok_id = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(s)
        };
        let mut eos_ids = eos_from_config.to_vec();
        if eos_ids.is_empty() {
            eos_ids.extend(tok_id("eos_token"));
        }
        Ok(Self {
            bos_id: bos_from_config.or_else(|| tok_id("bos_token")),
            pad_id: tok_id("pad_token"),
            add_bos: cfg
                .get("add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: cfg
                .get("chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            eos_ids,
            inner,
        })
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encode `text`. With `add_special`, the tokenizer's own rules apply (BERT's `[CLS] ... [SEP]`,
    /// a BOS when the config asks for one); without, the text is tokenized verbatim.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::invalid(format!("tokenizer: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special && self.add_bos {
            if let Some(b) = self.bos_id {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::invalid(format!("tokenizer: {e}")))
    }

    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    pub fn chat_format(&self) -> Option<ChatFormat> {
        let t = self.chat_template.as_deref()?;
        if !t.contains("<|im_start|>") {
            return None;
        }
        Some(ChatFormat::ChatMl {
            default_system: chatml_default_system(t),
        })
    }

    /// Render a conversation with the model's chat template, ending with the assistant's turn
    /// opened when `add_generation_prompt`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let fmt = self.chat_format().ok_or_else(|| match &self.chat_template {
            None => Error::invalid("the model has no chat template; drop --chat and give the prompt verbatim"),
            Some(_) => Error::invalid(
                "the model's chat template is not ChatML, the only format supported so far; drop --chat and format the prompt yourself",
            ),
        })?;
        let ChatFormat::ChatMl { default_system } = fmt;
        let mut out = String::new();
        if let Some(sys) = default_system {
            if messages.first().map(|m| m.role.as_str()) != Some("system") {
                out.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
            }
        }
        for m in messages {
            out.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        Ok(out)
    }
}

/// The system message a ChatML template inserts when the conversation starts without one: a
/// literal `<|im_start|>system\n...<|im_end|>` in the template source.
fn chatml_default_system(template: &str) -> Option<String> {
    if !template.contains("!= 'system'") && !template.contains("!= \"system\"") {
        return None;
    }
    let start = template.find("<|im_start|>system")? + "<|im_start|>system".len();
    let rest = &template[start..];
    let rest = rest
        .strip_prefix("\\n")
        .or_else(|| rest.strip_prefix('\n'))?;
    let end = rest.find("<|im_end|>")?;
    let sys = &rest[..end];
    if sys.contains("{{") || sys.contains('\'') || sys.contains('+') {
        return None;
    }
    Some(sys.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_smollm_default_system_prompt() {
        let t = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
        assert_eq!(
            chatml_default_system(t).as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        let plain = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}";
        assert_eq!(chatml_default_system(plain), None);
    }
}
