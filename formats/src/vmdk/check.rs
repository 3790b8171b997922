//! `check` for vmdk, as QEMU's `vmdk_co_check` does it: every grain (every flat extent)
//! must be readable from the grain tables and start inside its extent's file. QEMU stops
//! at the first problem.

use super::map::{Grain, Walker};
use super::{ExtentKind, VmdkImage};
use crate::error::Result;
use crate::qcow2::CheckReport;

/// Check `img`.
pub fn check(img: &VmdkImage) -> Result<CheckReport> {
    let mut rep = CheckReport {
        no_stats: true,
        no_repair: true,
        ..Default::default()
    };
    let total = img.size / 512;
    let mut sector = 0u64;
    let mut walker = Walker::default();
    let lens: Vec<u64> = img.files.iter().map(|f| f.len()).collect::<Result<_>>()?;
    while sector < total {
        let Some(ei) = img.find_extent(sector * 512) else {
            rep.messages
                .push(format!("ERROR: could not find extent for sector {sector}"));
            rep.fatal = Some("Invalid argument".into());
            break;
        };
        let e = &img.extents[ei];
        let (found, step) = match &e.kind {
            ExtentKind::Flat { offset } => (Ok(Grain::At(*offset)), e.sectors),
            ExtentKind::Sparse(s) => (
                walker.lookup(img, ei, sector * 512 - e.start),
                s.cluster_sectors,
            ),
        };
        match found {
            Err(_) => {
                rep.messages.push(format!(
                    "ERROR: could not get cluster_offset for sector {sector}"
                ));
                rep.fatal = Some("Operation not permitted".into());
                break;
            }
            Ok(Grain::At(h)) => {
                if h >= lens[e.file.0 as usize] {
                    rep.messages.push(format!(
                        "ERROR: cluster offset for sector {sector} points after EOF"
                    ));
                    rep.fatal = Some("Invalid argument".into());
                    break;
                }
            }
            Ok(_) => {}
        }
        sector += step.max(1);
    }
    Ok(rep)
}
