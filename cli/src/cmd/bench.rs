//! `bench`: qemu-img's benchmark on the engine. Options, validation messages and the two
//! output lines are qemu-img's; rimg adds `--output=json`, `--verbose` latency figures,
//! `--random`, `--time` and `-p`. Any format works: raw images are read and written in
//! place, other formats through their mapping and writer (see `rimg_engine::bench`).

use anyhow::{bail, Result};

use super::parse;
use crate::getopt::{o, OptSpec};

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('c', "count", true),
    o('d', "depth", true),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('i', "aio", true),
    o('n', "native", false),
    o('o', "offset", true),
    o('q', "", false),
    o('p', "", false),
    o('s', "buffer-size", true),
    o('S', "step-size", true),
    o('t', "cache", true),
    o('w', "write", false),
    o('U', "force-share", false),
    o('\0', "flush-interval", true),
    o('\0', "no-drain", false),
    o('\0', "pattern", true),
    o('\0', "object", true),
    // rimg's additions (never matched by an abbreviation)
    crate::getopt::extra("output", true),
    crate::getopt::extra("verbose", false),
    crate::getopt::extra("random", false),
    crate::getopt::extra("seed", true),
    crate::getopt::extra("time", true),
];

const HELP: &str = "Run a simple image benchmark.  Usage:

  qemu-img bench [-f FMT|--image-opts] [-c COUNT] [-d DEPTH] [-i AIO] [-n]
        [-o OFFSET] [-s BUFSIZE] [-S STEPSIZE] [-t CACHE] [-w [--pattern PATTERN]]
        [--flush-interval N [--no-drain]] [-q] [-U] [--object OBJDEF] FILE

rimg's additions:
  --output=json        one JSON object: requests, bytes, seconds, IOPS, MiB/s, latency
                       percentiles (ns) and the engine path used
  --verbose            after qemu-img's two lines, a latency summary and the engine path
  --random [--seed N]  step-aligned offsets in a reproducible random order
  --time SECONDS       run for that long (-c becomes an upper bound)
  -p                   show a progress line while running

Every format rimg writes can be benchmarked: raw images in place, others through
their mapping (reads) and allocation (writes, e.g. qcow2 cluster allocation).
-i threads runs the thread-pool path, -i io_uring the ring; -i native (Linux AIO) maps
to io_uring.
";

fn int_opt(name: &str, v: Option<&str>, default: u64, min: u64, max: u64) -> Result<u64> {
    let Some(v) = v else { return Ok(default) };
    match rimg_formats::opts::parse_size(v, 1) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) | Err(rimg_formats::opts::SizeError::Overflow) => {
            bail!("Invalid {name} specified. Must be between {min} and {max}.")
        }
        Err(_) => bail!("Invalid {name} specified: '{v}'."),
    }
}

/// Run `bench`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("bench", args, SPECS, HELP)?;
    const IMAX: u64 = i32::MAX as u64;
    // --time (rimg): run for that long; the count is then an upper bound.
    let time_limit = match o.get("time") {
        Some(t) => match t.parse::<f64>() {
            Ok(secs) if secs > 0.0 && secs.is_finite() => {
                Some(std::time::Duration::from_secs_f64(secs))
            }
            _ => bail!("Invalid time specified: '{t}'."),
        },
        None => None,
    };
    let default_count = if time_limit.is_some() {
        u64::MAX
    } else {
        75000
    };
    let count = match o.get("count") {
        Some(_) => int_opt("request count", o.get("count"), 75000, 1, IMAX)?,
        None => default_count,
    };
    let random = if o.has("random") {
        Some(int_opt(
            "seed",
            o.get("seed").or(Some("1")),
            1,
            0,
            u64::MAX,
        )?)
    } else {
        None
    };
    let depth = int_opt("queue depth", o.get("depth"), 64, 1, IMAX)?;
    let size = int_opt("buffer size", o.get("buffer-size"), 4096, 1, IMAX)?;
    let step = match o.get("step-size") {
        Some(_) => int_opt("step size", o.get("step-size"), 0, 0, IMAX)?,
        None => size,
    };
    let offset = int_opt("offset", o.get("offset"), 0, 0, i64::MAX as u64)?;
    let write = o.has("write");
    let pattern = match o.get("pattern") {
        Some(p) => match p.parse::<u64>() {
            Ok(n) if n <= 255 => n as u8,
            _ => bail!("Invalid pattern byte specified. Must be between 0 and 255."),
        },
        None => 0,
    };
    let backend = match o.get("aio") {
        None => rimg_engine::BackendChoice::Auto,
        Some("threads") => rimg_engine::BackendChoice::Threads,
        // Linux AIO has no rimg path of its own: io_uring is the closest.
        Some("native" | "io_uring") => rimg_engine::BackendChoice::IoUring,
        Some(a) => bail!("Invalid aio option: {a}"),
    };
    let cache = match o.get("cache") {
        Some(t) => {
            crate::common::cache_mode(t).map_err(|_| anyhow::anyhow!("Invalid cache mode"))?
        }
        None => rimg_engine::CacheMode::Writeback,
    };
    let flush_interval = match o.get("flush-interval") {
        Some(v) => {
            let n = int_opt("flush interval", Some(v), 0, 0, IMAX)?;
            if !write {
                bail!("--flush-interval is only available in write tests");
            }
            if n < depth {
                bail!("Flush interval can't be smaller than depth");
            }
            n
        }
        None => 0,
    };
    if o.pos.len() != 1 {
        return Err(super::usage_error("bench", "Expecting one image file name"));
    }
    let spec = crate::common::ImageSpec::resolve(&o.pos[0], o.get("format"), o.has("image-opts"))?;
    let access = if write {
        rimg_formats::Access::Write
    } else {
        rimg_formats::Access::Read
    };
    let chain = spec.open_chain(access, o.has("force-share"))?;
    let json = crate::common::output_format("bench", o.get("output"))?;
    let verbose = o.has("verbose") || crate::common::verbose();
    // qemu-img prints its two lines even with -q.
    if !json {
        let what = if write { "write" } else { "read" };
        let n = match time_limit {
            Some(t) if o.get("count").is_none() => {
                format!("{what} requests for {} seconds", t.as_secs_f64())
            }
            _ => format!("{count} {what} requests"),
        };
        let pattern_word = if random.is_some() {
            "random offsets from"
        } else {
            "starting at"
        };
        println!(
            "Sending {n}, {size} bytes each, {depth} in parallel ({pattern_word} offset {offset}, step size {step})"
        );
        if flush_interval > 0 {
            println!("Sending flush every {flush_interval} requests");
        }
    }
    let bench_opts = rimg_engine::bench::BenchOptions {
        count,
        depth,
        size,
        step,
        offset,
        write,
        pattern,
        cache,
        flush_interval,
        random,
        time_limit,
        drain: !o.has("no-drain"),
        backend,
    };
    let raw = chain.top().format() == "raw" && chain.layers().len() == 1;
    let progress = crate::progress::Progress::new(o.has("p") && !json);
    let report = |done: u64, total: u64| progress.update(done, total);
    let r = if raw {
        rimg_engine::bench::run(
            rimg_engine::bench::Target::Raw(chain.top()),
            &bench_opts,
            Some(&report),
        )
    } else {
        let writer = if write {
            Some(chain.top().writer().map_err(|e| anyhow::anyhow!("{e}"))?)
        } else {
            None
        };
        rimg_engine::bench::run(
            rimg_engine::bench::Target::Mapped {
                chain: std::sync::Arc::new(chain),
                writer,
            },
            &bench_opts,
            Some(&report),
        )
    };
    if r.is_ok() {
        progress.finish();
    }
    match r {
        Ok(r) => {
            let secs = r.elapsed.as_secs_f64();
            let h = &r.latency;
            let pct = |q: f64| h.value_at_quantile(q);
            if json {
                let v = serde_json::json!({
                    "requests": r.requests,
                    "bytes": r.requests * size,
                    "write": write,
                    "seconds": secs,
                    "iops": r.requests as f64 / secs.max(1e-9),
                    "mib-per-second": (r.requests * size) as f64 / (1 << 20) as f64 / secs.max(1e-9),
                    "latency-ns": {
                        "min": h.min(),
                        "p50": pct(0.5),
                        "p90": pct(0.9),
                        "p99": pct(0.99),
                        "p99.9": pct(0.999),
                        "max": h.max(),
                    },
                    "engine": r.path,
                });
                println!("{}", crate::output::qemu_json(&v));
            } else {
                println!("Run completed in {secs:.3} seconds.");
                if verbose {
                    println!(
                        "latency (us): min {:.1} p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
                        h.min() as f64 / 1e3,
                        pct(0.5) as f64 / 1e3,
                        pct(0.9) as f64 / 1e3,
                        pct(0.99) as f64 / 1e3,
                        pct(0.999) as f64 / 1e3,
                        h.max() as f64 / 1e3
                    );
                    for n in &r.path {
                        println!("engine: {n}");
                    }
                }
            }
            Ok(0)
        }
        Err(rimg_engine::Error::Io { source, .. }) => {
            bail!("Failed request: {}", rimg_formats::error::strerror(&source))
        }
        Err(e) => bail!("{e}"),
    }
}
