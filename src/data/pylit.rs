//! A parser for Python literals (`repr` of dicts, lists, strings, numbers, True/False/None), as
//! found in DialogSum's "JSONL" files. Produces `serde_json::Value`s.

use serde_json::{Map, Number, Value};

pub fn parse(s: &str) -> Result<Value, String> {
    let mut p = Parser {
        s: s.as_bytes(),
        i: 0,
        src: s,
    };
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("unexpected text after the literal at byte {}", p.i));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected `{}` at byte {}", c as char, self.i))
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        self.ws();
        match self.peek() {
            Some(b'{') => self.dict(),
            Some(b'[') | Some(b'(') => self.list(),
            Some(b'\'') | Some(b'"') => Ok(Value::String(self.string()?)),
            Some(c) if c == b'-' || c.is_ascii_digit() => self.number(),
            Some(_) => {
                for (word, v) in [
                    ("True", Value::Bool(true)),
                    ("False", Value::Bool(false)),
                    ("None", Value::Null),
                ] {
                    if self.src[self.i..].starts_with(word) {
                        self.i += word.len();
                        return Ok(v);
                    }
                }
                Err(format!("unexpected character at byte {}", self.i))
            }
            None => Err("unexpected end of input".into()),
        }
    }

    fn dict(&mut self) -> Result<Value, String> {
        self.expect(b'{')?;
        let mut m = Map::new();
        loop {
            self.ws();
            if self.peek() == Some(b'}') {
                self.i += 1;
                return Ok(Value::Object(m));
            }
            let k = match self.value()? {
                Value::String(s) => s,
                other => other.to_string(),
            };
            self.expect(b':')?;
            let v = self.value()?;
            m.insert(k, v);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {}
                _ => return Err(format!("expected `,` or `}}` at byte {}", self.i)),
            }
        }
    }

    fn list(&mut self) -> Result<Value, String> {
        let close = if self.peek() == Some(b'(') {
            b')'
        } else {
            b']'
        };
        self.i += 1;
        let mut v = vec![];
        loop {
            self.ws();
            if self.peek() == Some(close) {
                self.i += 1;
                return Ok(Value::Array(v));
            }
            v.push(self.value()?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(c) if c == close => {}
                _ => {
                    return Err(format!(
                        "expected `,` or `{}` at byte {}",
                        close as char, self.i
                    ))
                }
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let q = self.s[self.i];
        self.i += 1;
        let mut out = String::new();
        let start = self.i;
        let mut run_start = start;
        while self.i < self.s.len() {
            let c = self.s[self.i];
            if c == q {
                out.push_str(&self.src[run_start..self.i]);
                self.i += 1;
                return Ok(out);
            }
            if c == b'\\' {
                out.push_str(&self.src[run_start..self.i]);
                let e = *self.s.get(self.i + 1).ok_or("unterminated escape")?;
                self.i += 2;
                match e {
                    b'n' => out.push('\n'),
                    b't' => out.push('\t'),
                    b'r' => out.push('\r'),
                    b'\\' => out.push('\\'),
                    b'\'' => out.push('\''),
                    b'"' => out.push('"'),
                    b'0' => out.push('\0'),
                    b'x' | b'u' | b'U' => {
                        let n = match e {
                            b'x' => 2,
                            b'u' => 4,
                            _ => 8,
                        };
                        let hex = self.src.get(self.i..self.i + n).ok_or("short escape")?;
                        let cp = u32::from_str_radix(hex, 16)
                            .map_err(|_| format!("bad escape at byte {}", self.i))?;
                        out.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
                        self.i += n;
                    }
                    other => {
                        out.push('\\');
                        out.push(other as char);
                    }
                }
                run_start = self.i;
                continue;
            }
            self.i += 1;
        }
        Err(format!(
            "unterminated string starting at byte {}",
            start - 1
        ))
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.i;
        self.i += 1;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_digit() || b".eE+-".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        let t = &self.src[start..self.i];
        if let Ok(n) = t.parse::<i64>() {
            return Ok(Value::Number(n.into()));
        }
        t.parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("bad number `{t}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dialogsum_style_lines() {
        let v = parse(r##"{'fname': 'train_0', 'dialogue': "#Person1#: I'm here.\n#Person2#: Ok", 'n': 3, 'x': [1.5, None, True], 'u': '\u00e9\'s'}"##).unwrap();
        assert_eq!(v["fname"], "train_0");
        assert_eq!(v["dialogue"], "#Person1#: I'm here.\n#Person2#: Ok");
        assert_eq!(v["n"], 3);
        assert_eq!(v["x"][0], 1.5);
        assert!(v["x"][1].is_null());
        assert_eq!(v["u"], "é's");
        assert!(parse("{'a': 'unterminated}").is_err());
        assert!(parse("{'a' 1}").is_err());
    }
}
