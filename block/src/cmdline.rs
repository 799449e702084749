//! Boot configuration: qemu-storage-daemon's options on the kernel command
//! line (QEMU: `storage-daemon/qemu-storage-daemon.c`, `process_options`).
//!
//! [`tokenize`] cuts a whole command line into `--option value` pairs and
//! the other words the kernel handles itself. Values may be quoted with
//! `"…"`, given as `--option=value`, or be JSON objects with spaces inside
//! (`--blockdev {"driver": "null-co", "node-name": "n"}`): a word that
//! starts with `{` runs to its matching `}`.
//!
//! [`BlockLayer::apply_boot_option`] applies the options that belong to the
//! block layer — `--blockdev` (as `blockdev-add`, key=value with `driver`
//! implied, or JSON) and `--object` (as `object-add`, `qom-type` implied) —
//! and leaves `--nbd-server`, `--export`, `--chardev`, `--monitor` to the
//! kernel. The kernel applies them in order before the QMP greeting and
//! halts cleanly on the first error.

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde_json::{Map, Value};

use crate::graph::node::Node;
use crate::keyval::keyval_parse;
use crate::layer::BlockLayer;
use crate::options::Opts;

/// Options that take no argument.
const FLAGS: [&str; 5] = ["daemonize", "help", "version", "h", "V"];

/// One item of the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `--name value`, `--name=value`, or a flag (`--daemonize`).
    Option {
        /// The name without dashes (`blockdev`).
        name: String,
        /// The argument.
        value: Option<String>,
    },
    /// Anything else (`loglevel=debug`, `console=ttyS0`).
    Word(String),
}

/// A malformed command line or option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootError {
    /// The command line cannot be cut into words.
    Syntax(String),
    /// An option was refused: `--name value: message`.
    Option {
        /// Option name.
        name: String,
        /// Its argument.
        value: String,
        /// Why (QEMU's text).
        message: String,
    },
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Syntax(m) => f.write_str(m),
            BootError::Option {
                name,
                value,
                message,
            } => write!(f, "--{name} {value}: {message}"),
        }
    }
}

fn words(cmdline: &str) -> Result<Vec<String>, BootError> {
    let mut out = Vec::new();
    let chars: Vec<char> = cmdline.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let mut w = String::new();
        if chars[i] == '{' {
            // A JSON object: up to the matching brace, strings respected.
            let mut depth = 0usize;
            let mut quote: Option<char> = None;
            let start = i;
            while i < chars.len() {
                let c = chars[i];
                w.push(c);
                i += 1;
                match quote {
                    Some(q) if c == '\\' => {
                        if let Some(n) = chars.get(i) {
                            w.push(*n);
                            i += 1;
                        }
                        let _ = q;
                    }
                    Some(q) if c == q => quote = None,
                    Some(_) => {}
                    None if c == '"' || c == '\'' => quote = Some(c),
                    None if c == '{' || c == '[' => depth += 1,
                    None if c == '}' || c == ']' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            break;
                        }
                    }
                    None => {}
                }
            }
            if depth != 0 || quote.is_some() {
                let text: String = chars[start..].iter().collect();
                return Err(BootError::Syntax(format!(
                    "unterminated JSON value: {text}"
                )));
            }
        } else {
            let mut quoted = false;
            while i < chars.len() && (quoted || !chars[i].is_whitespace()) {
                if chars[i] == '"' {
                    quoted = !quoted;
                } else {
                    w.push(chars[i]);
                }
                i += 1;
            }
            if quoted {
                return Err(BootError::Syntax(String::from(
                    "unterminated quote on the command line",
                )));
            }
        }
        out.push(w);
    }
    Ok(out)
}

/// Cuts a kernel command line into options and words.
pub fn tokenize(cmdline: &str) -> Result<Vec<Token>, BootError> {
    let words = words(cmdline)?;
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let name = if let Some(n) = w.strip_prefix("--") {
            n
        } else if w.len() == 2 && w.starts_with('-') && w != "--" {
            &w[1..]
        } else {
            out.push(Token::Word(w));
            continue;
        };
        if name.is_empty() {
            return Err(BootError::Syntax(String::from("empty option '--'")));
        }
        if let Some((n, v)) = name.split_once('=') {
            out.push(Token::Option {
                name: String::from(n),
                value: Some(String::from(v)),
            });
        } else if FLAGS.contains(&name) {
            out.push(Token::Option {
                name: String::from(name),
                value: None,
            });
        } else {
            match it.next() {
                Some(v) => out.push(Token::Option {
                    name: String::from(name),
                    value: Some(v),
                }),
                None => {
                    return Err(BootError::Syntax(format!(
                        "option '--{name}' requires an argument"
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// An option argument as an object: JSON if it starts with `{`, else
/// keyval with `implied_key`. Returns the object and whether it is keyval.
pub fn option_object(value: &str, implied_key: &str) -> Result<(Map<String, Value>, bool), String> {
    if value.trim_start().starts_with('{') {
        match crate::qmp::json::from_slice(value.as_bytes())? {
            Value::Object(m) => Ok((m, false)),
            _ => Err(String::from("JSON argument must be an object")),
        }
    } else {
        keyval_parse(value, Some(implied_key))
            .map(|m| (m, true))
            .map_err(|e| e.0)
    }
}

impl BlockLayer {
    /// `--blockdev VALUE`: opens a node tree as `blockdev-add` does.
    pub fn boot_blockdev(&self, value: &str) -> Result<Rc<Node>, BootError> {
        let fail = |message: String| BootError::Option {
            name: "blockdev".into(),
            value: value.into(),
            message,
        };
        let (map, keyval) = option_object(value, "driver").map_err(fail)?;
        self.blockdev_add(&map, keyval).map_err(|e| fail(e.desc))
    }

    /// `--object VALUE`: creates an object as `object-add` does.
    pub fn boot_object(&self, value: &str) -> Result<(), BootError> {
        let fail = |message: String| BootError::Option {
            name: "object".into(),
            value: value.into(),
            message,
        };
        let (map, keyval) = option_object(value, "qom-type").map_err(fail)?;
        crate::object::object_add_opts(self, &Opts::new(&map, keyval)).map_err(|e| fail(e.desc))
    }

    /// Applies `--name value` if it is a block-layer option; returns
    /// whether it was.
    pub fn apply_boot_option(&self, name: &str, value: &str) -> Result<bool, BootError> {
        match name {
            "blockdev" => self.boot_blockdev(value).map(|_| true),
            "object" => self.boot_object(value).map(|()| true),
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn opt(name: &str, value: &str) -> Token {
        Token::Option {
            name: name.into(),
            value: Some(value.into()),
        }
    }

    #[test]
    fn tokenizes_qsd_options_and_kernel_words() {
        let t = tokenize(
            r#"loglevel=debug --blockdev null-co,node-name=n --blockdev {"driver": "raw", "node-name": "r", "file": {"driver": "null-co"}} --export=type=nbd,id=e --daemonize --nbd-server "addr.type=inet,addr.host=0.0.0.0""#,
        )
        .unwrap();
        assert_eq!(
            t,
            [
                Token::Word("loglevel=debug".into()),
                opt("blockdev", "null-co,node-name=n"),
                opt(
                    "blockdev",
                    r#"{"driver": "raw", "node-name": "r", "file": {"driver": "null-co"}}"#
                ),
                opt("export", "type=nbd,id=e"),
                Token::Option {
                    name: "daemonize".into(),
                    value: None
                },
                opt("nbd-server", "addr.type=inet,addr.host=0.0.0.0"),
            ]
        );
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(
            tokenize("--blockdev").unwrap_err().to_string(),
            "option '--blockdev' requires an argument"
        );
        assert!(tokenize(r#"--blockdev {"driver": "x""#).is_err());
        assert!(tokenize(r#"--x "abc"#).is_err());
        assert_eq!(
            tokenize(r#"--x {"a": "}"}"#).unwrap(),
            [opt("x", r#"{"a": "}"}"#)]
        );
    }

    #[test]
    fn option_objects() {
        let (m, kv) = option_object("raw,file.driver=null-co", "driver").unwrap();
        assert!(kv);
        assert_eq!(m["file"]["driver"], "null-co");
        let (m, kv) = option_object(r#"{'driver': 'null-co'}"#, "driver").unwrap();
        assert!(!kv);
        assert_eq!(m["driver"], "null-co");
        assert!(option_object("{1}", "driver").is_err());
    }
}
