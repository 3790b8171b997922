//! Output exactly as qemu-img prints it: human sizes and QEMU's pretty JSON.

use serde_json::Value;

/// qemu's `size_to_str`: three significant digits and a binary unit, where values of 1000 or
/// more of a unit already use the next one ("0.977 KiB" for 1000 bytes).
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let x = val as f64 / (1000.0 / 1024.0);
    // frexp exponent: smallest e with x < 2^e (x > 0).
    let e = if x < 1.0 {
        0
    } else {
        (x.log2().floor() as i64) + 1
    };
    let i = (((e - 1).max(0)) / 10).min(6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g3(val as f64 / div), SUFFIXES[i])
}

/// C's `%0.3g` for values in [0, 1000).
pub fn fmt_g3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let exp = v.abs().log10().floor() as i32;
    let decimals = (2 - exp).max(0) as usize;
    let mut s = format!("{v:.decimals$}");
    // Rounding can carry into a new digit (999.5 -> "1000"): C would print "1e+03".
    let digits = s.chars().filter(char::is_ascii_digit).count();
    if !s.contains('.') && digits > 3 {
        // Rounding carried into a fourth digit (999.5 -> 1000): %g switches to exponent form.
        return format!("1e+{:02}", exp + 1);
    }
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    s
}

/// Print a QAPI value in qemu-img's human form (its `dump_qobject`): one `key: value` per
/// line, dashes in keys shown as spaces, nested objects and lists indented 4 spaces a level,
/// list items as `[i]:`.
pub fn dump_human(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Object(m) => {
            for (k, item) in m {
                let composite = matches!(item, Value::Object(_) | Value::Array(_));
                pad(out, indent * 4);
                out.push_str(&k.replace('-', " "));
                out.push(':');
                if composite {
                    out.push('\n');
                    dump_human(out, item, indent + 1);
                } else {
                    out.push(' ');
                    dump_human(out, item, indent);
                }
            }
        }
        Value::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                pad(out, indent * 4);
                if matches!(item, Value::Object(_) | Value::Array(_)) {
                    out.push_str(&format!("[{i}]:\n"));
                    dump_human(out, item, indent + 1);
                } else {
                    out.push_str(&format!("[{i}]: "));
                    dump_human(out, item, indent);
                }
            }
        }
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Null => out.push_str("null\n"),
        other => {
            out.push_str(&other.to_string());
            out.push('\n');
        }
    }
}

/// Pretty-print a JSON value the way QEMU's `qobject_to_json_pretty` does (4-space indent,
/// empty containers still broken over two lines).
pub fn qemu_json(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v, 0);
    out
}

fn write_value(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            out.push_str("[\n");
            for (k, item) in a.iter().enumerate() {
                pad(out, indent + 4);
                write_value(out, item, indent + 4);
                if k + 1 < a.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            pad(out, indent);
            out.push(']');
        }
        Value::Object(m) => {
            out.push_str("{\n");
            let n = m.len();
            for (k, (key, item)) in m.iter().enumerate() {
                pad(out, indent + 4);
                write_str(out, key);
                out.push_str(": ");
                write_value(out, item, indent + 4);
                if k + 1 < n {
                    out.push(',');
                }
                out.push('\n');
            }
            pad(out, indent);
            out.push('}');
        }
    }
}

fn pad(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// QEMU's JSON string escaping: `"`, `\`, control characters, and everything outside ASCII
/// as `\uXXXX` (surrogate pairs above the BMP).
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04X}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The `Snapshot list:` table of `info` and `snapshot -l`, as qemu-img prints it (dates in
/// local time).
pub fn snapshot_table(snaps: &[rimg_formats::SnapshotInfo]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&format!(
        "{:<7} {:<16} {:>8}{:>20}{:>16}{:>11}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for sn in snaps {
        let date = chrono::DateTime::from_timestamp(i64::from(sn.date_sec), 0)
            .map(|d| {
                d.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            })
            .unwrap_or_default();
        let ms = sn.vm_clock_nsec / 1_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            ms / 3_600_000,
            (ms / 60_000) % 60,
            (ms / 1000) % 60,
            ms % 1000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        s.push_str(&format!(
            "{:<7} {:<16} {:>8}{:>20}{:>16}{:>11}\n",
            sn.id,
            sn.name,
            size_to_str(sn.vm_state_size),
            date,
            clock,
            icount
        ));
    }
    s
}

/// `snapshots` of `info --output=json` (QAPI `SnapshotInfo`, QEMU's key order).
pub fn snapshots_json(snaps: &[rimg_formats::SnapshotInfo]) -> Value {
    Value::Array(
        snaps
            .iter()
            .map(|sn| {
                let mut m = serde_json::Map::new();
                if let Some(i) = sn.icount {
                    m.insert("icount".into(), i.into());
                }
                m.insert(
                    "vm-clock-nsec".into(),
                    (sn.vm_clock_nsec % 1_000_000_000).into(),
                );
                m.insert("name".into(), sn.name.clone().into());
                m.insert("date-sec".into(), sn.date_sec.into());
                m.insert("date-nsec".into(), sn.date_nsec.into());
                m.insert(
                    "vm-clock-sec".into(),
                    (sn.vm_clock_nsec / 1_000_000_000).into(),
                );
                m.insert("id".into(), sn.id.clone().into());
                m.insert("vm-state-size".into(), sn.vm_state_size.into());
                Value::Object(m)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(4096), "4 KiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1536), "1.5 KiB");
        assert_eq!(size_to_str(1073995776), "1 GiB");
        assert_eq!(size_to_str(999 * 1024), "999 KiB");
        assert_eq!(size_to_str(1023488), "1e+03 KiB");
        assert_eq!(size_to_str(1047552), "0.999 MiB");
        assert_eq!(size_to_str(1234944), "1.18 MiB");
    }

    #[test]
    fn json_layout() {
        let v: Value = serde_json::from_str(r#"{"a": [], "b": {"c": 1}, "d": {}}"#).unwrap();
        assert_eq!(
            qemu_json(&v),
            "{\n    \"a\": [\n    ],\n    \"b\": {\n        \"c\": 1\n    },\n    \"d\": {\n    }\n}"
        );
    }
}
