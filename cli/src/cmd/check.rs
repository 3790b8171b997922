//! `check`: consistency check. Raw images have nothing to check (exit 63, as qemu-img).

use anyhow::Result;
use rimg_formats::Access;

use super::{parse, usage_error};
use crate::common::{output_format, report, ImageSpec};
use crate::getopt::{o, OptSpec};

const SPECS: &[OptSpec] = &[
    o('h', "help", false),
    o('f', "format", true),
    o('\0', "image-opts", false),
    o('q', "quiet", false),
    o('r', "repair", true),
    o('\0', "output", true),
    o('T', "cache", true),
    o('U', "force-share", false),
    o('\0', "object", true),
];

const HELP: &str = "Check basic image integrity.  Usage:

  qemu-img check [-f FMT|--image-opts] [-T CACHE_MODE] [-r leaks|all]
        [-U] [--output human|json] [-q] [--object OBJDEF] FILE

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specifies the format of the image explicitly (default: probing is used)
  --image-opts
     treat FILE as an option string (key=value,..), not a file name
     (incompatible with -f|--format)
  -T, --cache CACHE_MODE
     cache mode (default: writeback)
  -r, --repair leaks|all
     repair errors of the given category in the image (image will be
     opened in read-write mode, incompatible with -U|--force-share)
  -U, --force-share
     open image in shared mode for concurrent access
  --output human|json
     output format (default: human)
  -q, --quiet
     quiet mode (produce only error messages if any)
  --object OBJDEF
     defines QEMU user-creatable object
  FILE
     name of the image file, or an option string (key=value,..)
     with --image-opts, to operate on

Exit codes: 0 no errors, 1 check not completed, 2 corruptions found,
3 leaks found, 63 the format does not support checks.
";

/// Run `check`.
pub fn run(args: &[String]) -> Result<i32> {
    let o = parse("check", args, SPECS, HELP)?;
    if o.pos.len() != 1 {
        return Err(usage_error("check", "Expecting one image file name"));
    }
    output_format("check", o.get("output"))?;
    if let Some(r) = o.get("repair") {
        if r != "leaks" && r != "all" {
            return Err(usage_error(
                "check",
                &format!("--repair (-r) expects 'leaks' or 'all' not '{r}'"),
            ));
        }
        if o.has("force-share") {
            anyhow::bail!(
                "Could not open '{}': force-share=on can only be used with read-only images",
                o.pos[0]
            );
        }
    }
    if let Some(t) = o.get("cache") {
        crate::common::source_cache_mode(t)?;
    }
    let spec = ImageSpec::resolve(&o.pos[0], o.get("format"), o.has("image-opts"))?;
    let chain = spec.open_chain_for(
        if o.has("repair") {
            Access::Write
        } else {
            Access::Read
        },
        o.has("force-share"),
        true,
    )?;
    let quiet = o.has("quiet");
    let json = output_format("check", o.get("output"))?;
    let repaired = o
        .get("repair")
        .and_then(|m| chain.top().check_repair(m == "all"));
    let repairs_here = repaired.is_some();
    let Some(result) = repaired.or_else(|| chain.top().check()) else {
        report("This image format does not support checks");
        return Ok(63);
    };
    if o.has("repair") && result.as_ref().is_ok_and(|r| r.no_repair) {
        report("This image format does not support checks");
        return Ok(63);
    }
    if o.has("repair") && !repairs_here && !chain.top().check_repairs() {
        anyhow::bail!("repairing images is not supported by rimg yet");
    }
    let mut r = match result {
        Ok(r) => r,
        Err(e) => {
            report(&format!("Check failed: {e}"));
            return Ok(1);
        }
    };
    if r.corruptions_fixed > 0 || r.leaks_fixed > 0 {
        // The lines of the repairing pass come first (qemu prints them as it goes).
        for m in std::mem::take(&mut r.messages) {
            eprintln!("{m}");
        }
        // qemu-img reports the repairs, then checks the repaired image again.
        if !json && !quiet {
            print!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                r.leaks_fixed, r.corruptions_fixed
            );
        }
        let (cf, lf) = (r.corruptions_fixed, r.leaks_fixed);
        r = match chain.top().check() {
            Some(Ok(again)) => again,
            Some(Err(e)) => {
                report(&format!("Check failed: {e}"));
                return Ok(1);
            }
            None => r,
        };
        r.corruptions_fixed = cf;
        r.leaks_fixed = lf;
    }
    for m in &r.messages {
        eprintln!("{m}");
    }
    if let Some(why) = &r.fatal {
        report(&format!("Check failed: {why}"));
        return Ok(1);
    }
    let path = &chain.layers()[0].filename;
    if json {
        let mut m = serde_json::Map::new();
        // Keys in the order QEMU's QDict prints them; zero counts are left out as QEMU
        // leaves them out.
        if !r.no_stats && r.image_end_offset > 0 {
            m.insert("image-end-offset".into(), r.image_end_offset.into());
        }
        if r.compressed_clusters > 0 {
            m.insert("compressed-clusters".into(), r.compressed_clusters.into());
        }
        if !r.no_stats && r.total_clusters > 0 {
            m.insert("total-clusters".into(), r.total_clusters.into());
        }
        if r.corruptions > 0 {
            m.insert("corruptions".into(), r.corruptions.into());
        }
        if r.corruptions_fixed > 0 {
            m.insert("corruptions-fixed".into(), r.corruptions_fixed.into());
        }
        m.insert("check-errors".into(), r.check_errors.into());
        if r.leaks > 0 {
            m.insert("leaks".into(), r.leaks.into());
        }
        if r.leaks_fixed > 0 {
            m.insert("leaks-fixed".into(), r.leaks_fixed.into());
        }
        if !r.no_stats && r.allocated_clusters > 0 {
            m.insert("allocated-clusters".into(), r.allocated_clusters.into());
        }
        m.insert("filename".into(), path.clone().into());
        m.insert("format".into(), chain.top().format().into());
        if r.fragmented_clusters > 0 {
            m.insert("fragmented-clusters".into(), r.fragmented_clusters.into());
        }
        println!(
            "{}",
            crate::output::qemu_json(&serde_json::Value::Object(m))
        );
    } else if !quiet {
        let mut s = String::new();
        if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if r.corruptions > 0 {
                s.push_str(&format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    r.corruptions
                ));
            }
            if r.leaks > 0 {
                s.push_str(&format!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    r.leaks
                ));
            }
        }
        if !r.no_stats && r.total_clusters > 0 && r.allocated_clusters > 0 {
            let pct = |n: u64| n as f64 * 100.0 / r.total_clusters as f64;
            let frag = if r.allocated_clusters > 0 {
                r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64
            } else {
                0.0
            };
            let comp = if r.allocated_clusters > 0 {
                r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64
            } else {
                0.0
            };
            s.push_str(&format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                r.allocated_clusters,
                r.total_clusters,
                pct(r.allocated_clusters),
                frag,
                comp
            ));
        }
        if !r.no_stats && r.image_end_offset > 0 {
            s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
        }
        print!("{s}");
    }
    Ok(if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}
