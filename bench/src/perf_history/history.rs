//! Reading the history file written by `side-by-side`: one JSON object per line and workload, grouped
//! into runs by `run_id`.

use std::path::Path;

use serde_json::Value;

use crate::Result;

/// One workload's result in one run.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// Workload name.
    pub(crate) workload: String,
    /// median(qemu-img) / median(rimg); `None` when the workload failed.
    pub(crate) ratio: Option<f64>,
    /// Relative noise of the ratio (the two tools' spreads, added in quadrature).
    pub(crate) noise: f64,
    /// rimg's median seconds.
    pub(crate) rimg_median: Option<f64>,
    /// Why the workload failed, if it did.
    pub(crate) error: Option<String>,
}

/// All lines of one harness run.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    /// The run's id (`date-pid`).
    pub(crate) id: String,
    /// UTC start date.
    pub(crate) date: String,
    /// Commit measured, if known.
    pub(crate) commit: Option<String>,
    /// Whether the work tree was dirty.
    pub(crate) dirty: bool,
    /// Image size in bytes.
    pub(crate) size: u64,
    /// Host name of the machine.
    pub(crate) host: String,
    /// qemu-img's version line.
    pub(crate) qemu_version: String,
    /// Results, in run order.
    pub(crate) entries: Vec<Entry>,
}

impl Run {
    /// A short label: the commit's first 8 hex digits (with `+` if dirty), else the date.
    pub(crate) fn label(&self) -> String {
        match &self.commit {
            Some(c) => format!(
                "{}{}",
                &c[..c.len().min(8)],
                if self.dirty { "+" } else { "" }
            ),
            None => self.date.clone(),
        }
    }

    /// The entry of `workload`, if the run has one.
    pub(crate) fn entry(&self, workload: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.workload == workload)
    }
}

/// A number field of a line.
fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// A string field of a line.
fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Relative half-range of a sample array (the harness's `*_spread`, for lines that lack it).
fn spread_of(v: &Value, key: &str) -> Option<f64> {
    let xs: Vec<f64> = v
        .get(key)?
        .as_array()?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let mut s = xs.clone();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return None;
    }
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (med > 0.0).then(|| (s[n - 1] - s[0]) / (2.0 * med))
}

/// Parses one history line into its run key and entry.
fn parse_line(v: &Value) -> Option<(String, Entry)> {
    let workload = text(v, "workload")?;
    let key = text(v, "run_id").unwrap_or_else(|| {
        format!(
            "{}-{}",
            text(v, "date").unwrap_or_default(),
            text(v, "git_commit").unwrap_or_default()
        )
    });
    let noise = num(v, "ratio_noise").unwrap_or_else(|| {
        let r = spread_of(v, "rimg_samples_s").unwrap_or(0.0);
        let q = spread_of(v, "qemu_samples_s").unwrap_or(0.0);
        r.hypot(q)
    });
    let entry = Entry {
        workload,
        ratio: num(v, "ratio").filter(|r| r.is_finite() && *r > 0.0),
        noise,
        rimg_median: num(v, "rimg_median_s"),
        error: text(v, "error"),
    };
    Some((key, entry))
}

/// Reads the history at `path` into runs, oldest first (file order).
pub(crate) fn load(path: &Path) -> Result<Vec<Run>> {
    let text_all = std::fs::read_to_string(path)
        .map_err(|e| format!("reading history {}: {e}", path.display()))?;
    let mut runs: Vec<Run> = Vec::new();
    for (n, line) in text_all.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not JSON: {e}", path.display(), n + 1))?;
        let Some((key, entry)) = parse_line(&v) else {
            return Err(format!(
                "{}:{}: no \"workload\" field",
                path.display(),
                n + 1
            ));
        };
        if runs.last().map(|r| &r.id) != Some(&key) {
            runs.push(Run {
                id: key,
                date: text(&v, "date").unwrap_or_default(),
                commit: text(&v, "git_commit"),
                dirty: v.get("git_dirty").and_then(Value::as_bool).unwrap_or(false),
                size: v.get("size_bytes").and_then(Value::as_u64).unwrap_or(0),
                host: v
                    .pointer("/machine/hostname")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                qemu_version: text(&v, "qemu_version").unwrap_or_default(),
                entries: Vec::new(),
            });
        }
        let run = runs.last_mut().expect("just pushed");
        run.entries.retain(|e| e.workload != entry.workload);
        run.entries.push(entry);
    }
    if runs.is_empty() {
        return Err(format!("history {} holds no runs", path.display()));
    }
    Ok(runs)
}

/// Finds a run: `-1` is the newest, `-2` the one before; `1` the oldest; anything else is a prefix of a
/// run id or of a commit (the newest match wins).
pub(crate) fn select<'a>(runs: &'a [Run], sel: &str) -> Result<&'a Run> {
    if let Ok(i) = sel.parse::<i64>() {
        let idx = if i < 0 { runs.len() as i64 + i } else { i - 1 };
        return usize::try_from(idx)
            .ok()
            .and_then(|i| runs.get(i))
            .ok_or_else(|| format!("no run {sel} (the history holds {})", runs.len()));
    }
    runs.iter()
        .rev()
        .find(|r| r.id.starts_with(sel) || r.commit.as_deref().is_some_and(|c| c.starts_with(sel)))
        .ok_or_else(|| format!("no run whose id or commit starts with {sel:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_lines_into_runs_and_selects() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.jsonl");
        let line = |run: &str, commit: &str, w: &str, ratio: f64| {
            format!(
                "{{\"run_id\":\"{run}\",\"git_commit\":\"{commit}\",\"workload\":\"{w}\",\"ratio\":{ratio},\
                 \"rimg_samples_s\":[0.9,1.0,1.1],\"qemu_samples_s\":[1.0,1.0]}}\n"
            )
        };
        let text = [
            line("r1", "aaaa", "x", 1.0),
            line("r1", "aaaa", "y", 2.0),
            line("r2", "bbbb", "x", 1.5),
        ]
        .concat();
        std::fs::write(&p, text).unwrap();
        let runs = load(&p).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].entries.len(), 2);
        assert!((runs[0].entry("x").unwrap().noise - 0.1).abs() < 1e-9);
        assert_eq!(select(&runs, "-1").unwrap().id, "r2");
        assert_eq!(select(&runs, "1").unwrap().id, "r1");
        assert_eq!(select(&runs, "aa").unwrap().id, "r1");
        assert!(select(&runs, "-3").is_err());
    }
}
