//! Which modules a delta attaches to, with Hugging Face PEFT's selection rules:
//! - `target_modules` as a list: a module matches when its name equals an entry or ends with
//!   `.` + entry;
//! - `target_modules` as a string: a regular expression that must match the whole name;
//! - `layers_to_transform`: only modules under `<layers_pattern>.<i>.` for a listed `i`;
//! - `rank_pattern` / `alpha_pattern` keys: regular expressions matched against the end of the
//!   name (`(.*\.)?key$`).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        TargetModules::List(vec![])
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerSelection {
    One(usize),
    Many(Vec<usize>),
}

impl LayerSelection {
    pub fn contains(&self, i: usize) -> bool {
        match self {
            LayerSelection::One(l) => *l == i,
            LayerSelection::Many(v) => v.contains(&i),
        }
    }
}

/// A compiled selection.
#[derive(Clone, Debug)]
pub struct Selector {
    list: Vec<String>,
    regex: Option<regex::Regex>,
    layers: Option<LayerSelection>,
    layers_pattern: Vec<String>,
}

impl Selector {
    pub fn new(
        targets: &TargetModules,
        layers: Option<&LayerSelection>,
        layers_pattern: Option<&[String]>,
    ) -> Result<Self> {
        let (list, regex) = match targets {
            TargetModules::List(v) => (v.clone(), None),
            TargetModules::Regex(r) => {
                let re = regex::Regex::new(&format!("^(?:{r})$"))
                    .map_err(|e| Error::invalid(format!("target_modules regex `{r}`: {e}")))?;
                (vec![], Some(re))
            }
        };
        Ok(Self {
            list,
            regex,
            layers: layers.cloned(),
            layers_pattern: layers_pattern.map(<[String]>::to_vec).unwrap_or_else(|| {
                vec!["layers".into(), "layer".into(), "h".into(), "blocks".into()]
            }),
        })
    }

    pub fn matches(&self, module: &str) -> bool {
        let hit = match &self.regex {
            Some(re) => re.is_match(module),
            None => self
                .list
                .iter()
                .any(|t| module == t || module.ends_with(&format!(".{t}"))),
        };
        if !hit {
            return false;
        }
        match &self.layers {
            None => true,
            Some(sel) => layer_index(module, &self.layers_pattern).is_some_and(|i| sel.contains(i)),
        }
    }
}

/// The layer index in a module name such as `model.layers.12.mlp.up_proj`.
pub fn layer_index(module: &str, patterns: &[String]) -> Option<usize> {
    let parts: Vec<&str> = module.split('.').collect();
    parts.windows(2).find_map(|w| {
        if patterns.iter().any(|p| p == w[0]) {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

/// The value of the first pattern key matching `module` as `(.*\.)?key$`, PEFT's rule for
/// `rank_pattern` and `alpha_pattern`.
pub fn pattern_value<T: Copy>(
    patterns: &std::collections::BTreeMap<String, T>,
    module: &str,
) -> Result<Option<T>> {
    for (key, v) in patterns {
        let re = regex::Regex::new(&format!("^(?:.*\\.)?(?:{key})$"))
            .map_err(|e| Error::invalid(format!("pattern key `{key}`: {e}")))?;
        if re.is_match(module) {
            return Ok(Some(*v));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_regex_and_layers() {
        let s = Selector::new(
            &TargetModules::List(vec!["q_proj".into(), "mlp.down_proj".into()]),
            None,
            None,
        )
        .unwrap();
        assert!(s.matches("model.layers.3.self_attn.q_proj"));
        assert!(s.matches("model.layers.3.mlp.down_proj"));
        assert!(!s.matches("model.layers.3.self_attn.qq_proj"));
        let r = Selector::new(
            &TargetModules::Regex(r".*\.(q_proj|up_proj)".into()),
            Some(&LayerSelection::Many(vec![0, 29])),
            None,
        )
        .unwrap();
        assert!(r.matches("model.layers.29.mlp.up_proj"));
        assert!(!r.matches("model.layers.2.mlp.up_proj"));
        assert!(!r.matches("model.layers.0.mlp.up_proj.extra"));
        let mut pats = std::collections::BTreeMap::new();
        pats.insert("o_proj".to_string(), 2usize);
        assert_eq!(
            pattern_value(&pats, "model.layers.1.self_attn.o_proj").unwrap(),
            Some(2)
        );
        assert_eq!(
            pattern_value(&pats, "model.layers.1.self_attn.xo_proj").unwrap(),
            None
        );
    }
}
