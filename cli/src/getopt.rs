//! GNU `getopt_long` semantics, as qemu-img uses them.
//!
//! clap cannot reproduce them exactly, and callers depend on the details: options anywhere
//! on the line (permutation: Nova runs `qemu-img info PATH --force-share --output=json`),
//! unambiguous long-option prefixes (`--out=json`), attached short arguments (`-fraw`),
//! clustered flags (`-qp`), `--` ending the options, and qemu-img's error wording.

/// One option a command accepts.
#[derive(Clone, Copy, Debug)]
pub struct OptSpec {
    /// short letter, if any
    pub short: Option<char>,
    /// long name without dashes ("" for none)
    pub long: &'static str,
    /// takes an argument
    pub arg: bool,
    /// matched only when spelled out (rimg's additions to qemu-img's tables, so qemu-img's
    /// abbreviations keep meaning what they mean there)
    pub exact: bool,
}

/// Shorthand constructor: `o('f', "format", true)`; use `'\0'` for "no short letter".
pub const fn o(short: char, long: &'static str, arg: bool) -> OptSpec {
    OptSpec {
        short: if short == '\0' { None } else { Some(short) },
        long,
        arg,
        exact: false,
    }
}

/// A long-only option rimg adds to a qemu-img command: never matched by a prefix.
pub const fn extra(long: &'static str, arg: bool) -> OptSpec {
    OptSpec {
        short: None,
        long,
        arg,
        exact: true,
    }
}

/// A parsed option: which spec (by index) and its argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// index into the spec list
    pub idx: usize,
    /// the argument, if the option takes one
    pub val: Option<String>,
}

/// A usage error, worded as qemu-img words it (without the program name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageError {
    /// `unrecognized option '--foo'` / `invalid option -- 'z'`
    Unrecognized(String),
    /// `option requires an argument -- 'f'` / `option '--format' requires an argument`
    MissingArg(String),
    /// `option '--quiet' doesn't allow an argument`
    UnexpectedArg(String),
    /// `option '--f' is ambiguous; possibilities: ...`
    Ambiguous(String),
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UsageError::Unrecognized(s)
            | UsageError::MissingArg(s)
            | UsageError::UnexpectedArg(s)
            | UsageError::Ambiguous(s) => f.write_str(s),
        }
    }
}

/// Parse `args` (without the command name) against `specs`. Returns the options in order
/// and the positional arguments in order.
pub fn parse(args: &[String], specs: &[OptSpec]) -> Result<(Vec<Parsed>, Vec<String>), UsageError> {
    let mut opts = Vec::new();
    let mut pos = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--" {
            pos.extend(args[i + 1..].iter().cloned());
            break;
        }
        if !parse_element(args, &mut i, specs, &mut opts)? {
            pos.push(args[i].clone());
            i += 1;
        } else if opts.last().is_some_and(|p| specs[p.idx].long == "help") {
            // getopt acts on options in order: help wins over anything after it.
            break;
        }
    }
    Ok((opts, pos))
}

/// Parse options up to the first non-option (getopt's "+" mode, as qemu-img's global
/// options); returns the options and the index of the first argument not consumed.
pub fn parse_in_order(
    args: &[String],
    specs: &[OptSpec],
) -> Result<(Vec<Parsed>, usize), UsageError> {
    let mut opts = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--" {
            return Ok((opts, i + 1));
        }
        if !parse_element(args, &mut i, specs, &mut opts)? {
            break;
        }
    }
    Ok((opts, i))
}

/// Parse the option element at `args[*i]` (and its separate argument); returns false
/// without consuming anything when it is not an option.
fn parse_element(
    args: &[String],
    i: &mut usize,
    specs: &[OptSpec],
    opts: &mut Vec<Parsed>,
) -> Result<bool, UsageError> {
    let a = &args[*i];
    if let Some(body) = a.strip_prefix("--") {
        *i += 1;
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        let idx = find_long(specs, name, a)?;
        let spec = specs[idx];
        let val = if spec.arg {
            match inline {
                Some(v) => Some(v),
                None if *i < args.len() => {
                    *i += 1;
                    Some(args[*i - 1].clone())
                }
                None => {
                    return Err(UsageError::MissingArg(format!(
                        "option '--{}' requires an argument",
                        spec.long
                    )))
                }
            }
        } else {
            if inline.is_some() {
                return Err(UsageError::UnexpectedArg(format!(
                    "option '--{}' doesn't allow an argument",
                    spec.long
                )));
            }
            None
        };
        opts.push(Parsed { idx, val });
        return Ok(true);
    }
    if a.len() > 1 && a.starts_with('-') {
        *i += 1;
        let chars: Vec<char> = a[1..].chars().collect();
        let mut k = 0;
        while k < chars.len() {
            let c = chars[k];
            k += 1;
            let Some(idx) = specs.iter().position(|s| s.short == Some(c)) else {
                return Err(UsageError::Unrecognized(format!("invalid option -- '{c}'")));
            };
            if specs[idx].arg {
                let rest: String = chars[k..].iter().collect();
                let val = if !rest.is_empty() {
                    rest
                } else if *i < args.len() {
                    *i += 1;
                    args[*i - 1].clone()
                } else {
                    return Err(UsageError::MissingArg(format!(
                        "option requires an argument -- '{c}'"
                    )));
                };
                opts.push(Parsed {
                    idx,
                    val: Some(val),
                });
                break;
            }
            opts.push(Parsed { idx, val: None });
        }
        return Ok(true);
    }
    Ok(false)
}

fn find_long(specs: &[OptSpec], name: &str, arg: &str) -> Result<usize, UsageError> {
    if let Some(i) = specs
        .iter()
        .position(|s| !s.long.is_empty() && s.long == name)
    {
        return Ok(i);
    }
    let matches: Vec<usize> = specs
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            !s.long.is_empty() && !name.is_empty() && s.long.starts_with(name) && !s.exact
        })
        .map(|(i, _)| i)
        .collect();
    match matches.len() {
        0 => Err(UsageError::Unrecognized(format!(
            "unrecognized option '{arg}'"
        ))),
        1 => Ok(matches[0]),
        _ => {
            // Prefixes of several names of the same option (same short letter) are fine.
            let first = specs[matches[0]];
            if matches.iter().all(|&m| {
                specs[m].short.is_some()
                    && specs[m].short == first.short
                    && specs[m].arg == first.arg
            }) {
                return Ok(matches[0]);
            }
            let list: Vec<String> = matches
                .iter()
                .map(|&m| format!("'--{}'", specs[m].long))
                .collect();
            Err(UsageError::Ambiguous(format!(
                "option '{arg}' is ambiguous; possibilities: {}",
                list.join(" ")
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    const SPECS: &[OptSpec] = &[
        o('f', "format", true),
        o('q', "quiet", false),
        o('\0', "output", true),
        o('U', "force-share", false),
        o('\0', "object", true),
    ];

    #[test]
    fn permutes_and_abbreviates() {
        let (o, p) = parse(&s(&["img", "--force-share", "--out=json", "-fraw"]), SPECS).unwrap();
        assert_eq!(p, s(&["img"]));
        assert_eq!(o.len(), 3);
        assert_eq!(
            o[1],
            Parsed {
                idx: 2,
                val: Some("json".into())
            }
        );
        assert_eq!(
            o[2],
            Parsed {
                idx: 0,
                val: Some("raw".into())
            }
        );
    }

    #[test]
    fn errors_like_getopt() {
        assert_eq!(
            parse(&s(&["--nope"]), SPECS).unwrap_err().to_string(),
            "unrecognized option '--nope'"
        );
        assert_eq!(
            parse(&s(&["-z"]), SPECS).unwrap_err().to_string(),
            "invalid option -- 'z'"
        );
        assert_eq!(
            parse(&s(&["-f"]), SPECS).unwrap_err().to_string(),
            "option requires an argument -- 'f'"
        );
        assert!(matches!(
            parse(&s(&["--o", "x"]), SPECS),
            Err(UsageError::Ambiguous(_))
        ));
        let (_, p) = parse(&s(&["-q", "--", "-f"]), SPECS).unwrap();
        assert_eq!(p, s(&["-f"]));
    }
}
