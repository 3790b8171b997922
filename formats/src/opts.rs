//! qemu-img's option syntax: sizes with suffixes, and `-o key=value,...` strings.

use crate::error::{Error, Result};

/// Why a size string was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// not a number with an optional suffix
    Invalid,
    /// does not fit in 64 bits
    Overflow,
}

/// Parse a size as qemu's `qemu_strtosz` does: a decimal number (hexadecimal with `0x`
/// when there is no suffix and no fraction), an optional fraction, and an optional suffix
/// `B`, `k`/`K`, `M`, `G`, `T`, `P`, `E` (powers of 1024). `default_unit` applies when no
/// suffix is given (qemu-img uses bytes; `-S` and `-r` too).
pub fn parse_size(s: &str, default_unit: u64) -> std::result::Result<u64, SizeError> {
    // Leading blanks are skipped (strtoull); trailing ones are refused.
    let t = s.trim_start();
    let t = t.strip_prefix('+').unwrap_or(t);
    if let Some(neg) = t.strip_prefix('-') {
        // A well-formed negative number is out of range; anything else is invalid.
        return match parse_size(neg, default_unit) {
            Ok(0) => Ok(0),
            Ok(_) | Err(SizeError::Overflow) => Err(SizeError::Overflow),
            Err(e) => Err(e),
        };
    }
    if t.is_empty() {
        return Err(SizeError::Invalid);
    }
    let (hex, digits_start) = if t.len() > 2 && (t.starts_with("0x") || t.starts_with("0X")) {
        (true, 2)
    } else {
        (false, 0)
    };
    let body = &t[digits_start..];
    let int_len = body
        .find(|c: char| {
            !(if hex {
                c.is_ascii_hexdigit()
            } else {
                c.is_ascii_digit()
            })
        })
        .unwrap_or(body.len());
    if int_len == 0 {
        return Err(SizeError::Invalid);
    }
    let int_part = &body[..int_len];
    let mut rest = &body[int_len..];
    let int_val = if hex {
        u64::from_str_radix(int_part, 16).map_err(|_| SizeError::Overflow)?
    } else {
        int_part.parse::<u64>().map_err(|_| SizeError::Overflow)?
    };
    let mut frac: Option<&str> = None;
    if !hex && rest.starts_with('.') {
        let f = &rest[1..];
        let n = f.find(|c: char| !c.is_ascii_digit()).unwrap_or(f.len());
        if n == 0 {
            return Err(SizeError::Invalid);
        }
        frac = Some(&f[..n]);
        rest = &f[n..];
    }
    let unit = match rest {
        "" => default_unit,
        "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(SizeError::Invalid),
    };
    if hex && !rest.is_empty() {
        return Err(SizeError::Invalid);
    }
    let whole = int_val.checked_mul(unit).ok_or(SizeError::Overflow)?;
    let Some(frac) = frac else {
        return Ok(whole);
    };
    if unit == 1 {
        // A fraction of a byte is refused (qemu: "1.5" alone or "1.5B").
        if frac.bytes().all(|b| b == b'0') {
            return Ok(whole);
        }
        return Err(SizeError::Invalid);
    }
    // fraction * unit, truncated, computed without floating point.
    let mut num: u128 = 0;
    let mut den: u128 = 1;
    for b in frac.bytes().take(30) {
        num = num * 10 + u128::from(b - b'0');
        den *= 10;
    }
    let add = (num * u128::from(unit)) / den;
    whole.checked_add(add as u64).ok_or(SizeError::Overflow)
}

/// The type of a create option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptKind {
    /// a size with suffixes
    Size,
    /// on/off
    Bool,
    /// free text (or one of a fixed set, checked by the driver)
    Str,
    /// a plain number
    Number,
}

/// One create option a driver accepts.
#[derive(Clone, Copy, Debug)]
pub struct OptionDesc {
    /// name, as in `-o name=value`
    pub name: &'static str,
    /// value type
    pub kind: OptKind,
    /// help text, as `-o help` prints it
    pub help: &'static str,
}

/// `-o` options as given: ordered `(name, value)` pairs; bare names mean `on`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OptionMap {
    items: Vec<(String, String)>,
}

impl OptionMap {
    /// Parse one or more `-o` strings (qemu joins repeated `-o` with commas). `,,` escapes a
    /// comma inside a value. A bare `name` means `name=on`.
    pub fn parse(s: &str) -> OptionMap {
        let mut m = OptionMap::default();
        m.extend_from(s);
        m
    }

    /// Add the items of another `-o` string; later values win.
    pub fn extend_from(&mut self, s: &str) {
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for it in items {
            if it.is_empty() {
                continue;
            }
            let (k, v) = match it.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (it.clone(), "on".to_string()),
            };
            self.set(&k, &v);
        }
    }

    /// Set `name` to `value`, replacing an earlier value.
    pub fn set(&mut self, name: &str, value: &str) {
        if let Some(slot) = self.items.iter_mut().find(|(k, _)| k == name) {
            slot.1 = value.to_string();
        } else {
            self.items.push((name.to_string(), value.to_string()));
        }
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Remove and return `name`.
    pub fn take(&mut self, name: &str) -> Option<String> {
        let i = self.items.iter().position(|(k, _)| k == name)?;
        Some(self.items.remove(i).1)
    }

    /// Whether `help` or `?` was asked for.
    pub fn wants_help(&self) -> bool {
        self.items.iter().any(|(k, _)| k == "help" || k == "?")
    }

    /// All items in order.
    pub fn items(&self) -> &[(String, String)] {
        &self.items
    }

    /// Whether nothing was given.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Check only that every name is one of `descs`.
    pub fn validate_names(&self, descs: &[OptionDesc]) -> Result<()> {
        match self
            .items
            .iter()
            .find(|(k, _)| !descs.iter().any(|d| d.name == k))
        {
            Some((k, _)) => Err(Error::InvalidArgument(format!("Invalid parameter '{k}'"))),
            None => Ok(()),
        }
    }

    /// Check every name against `descs`, as qemu does: `Invalid parameter 'foo'`.
    pub fn validate(&self, descs: &[OptionDesc]) -> Result<()> {
        for (k, v) in &self.items {
            let Some(d) = descs.iter().find(|d| d.name == k) else {
                return Err(Error::InvalidArgument(format!("Invalid parameter '{k}'")));
            };
            match d.kind {
                OptKind::Size => {
                    parse_size(v, 1).map_err(|_| {
                        Error::InvalidArgument(format!(
                            "Parameter '{k}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
                        ))
                    })?;
                }
                OptKind::Bool => {
                    parse_bool(v).ok_or_else(|| {
                        Error::InvalidArgument(format!("Parameter '{k}' expects 'on' or 'off'"))
                    })?;
                }
                OptKind::Number => {
                    v.parse::<u64>().map_err(|_| {
                        Error::InvalidArgument(format!("Parameter '{k}' expects a number"))
                    })?;
                }
                OptKind::Str => {}
            }
        }
        Ok(())
    }
}

/// qemu's boolean option values.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(parse_size("1G", 1), Ok(1 << 30));
        assert_eq!(parse_size("1.5k", 1), Ok(1536));
        assert_eq!(parse_size("512", 1), Ok(512));
        assert_eq!(parse_size("0x1000", 1), Ok(4096));
        assert_eq!(parse_size("12Q", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size("-5", 1), Err(SizeError::Overflow));
        assert_eq!(parse_size(" 1M", 1), Ok(1 << 20));
        assert_eq!(parse_size("1M ", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size("+1k", 1), Ok(1024));
        assert_eq!(parse_size("1 M", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size("010", 1), Ok(10));
        assert_eq!(
            parse_size("99999999999999999999", 1),
            Err(SizeError::Overflow)
        );
        assert_eq!(parse_size("16E", 1), Err(SizeError::Overflow));
        assert_eq!(parse_size("", 1), Err(SizeError::Invalid));
    }

    #[test]
    fn option_strings() {
        let m = OptionMap::parse("compat=1.1,lazy_refcounts,backing_file=a,,b");
        assert_eq!(m.get("compat"), Some("1.1"));
        assert_eq!(m.get("lazy_refcounts"), Some("on"));
        assert_eq!(m.get("backing_file"), Some("a,b"));
    }
}
