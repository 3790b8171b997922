//! Steady memory for buffered workloads on a VM whose balloon reports free pages to its host.
//!
//! With virtio-balloon free page reporting the guest hands memory it frees back to the host, which
//! discards it; the guest's next use of such a page faults it back in on the host (measured here: about
//! 2.5 ms per MiB). A buffered convert writes GiBs into fresh page-cache pages, so its time depended on how
//! much of the memory freed by the previous run's deleted output had been reported in between: the same
//! rimg binary took 0.6 s or 5.7 s for a 2 GiB raw->raw convert, depending only on whether the harness
//! slept 0 or 5 s after removing the previous output; either tool could land in either mode.
//!
//! The harness therefore pauses reporting for the run (it raises the `page_reporting` module's
//! `page_reporting_order` above the largest buddy order, so no free block qualifies, and puts the old
//! value back at the end), and touches a few GiB of memory once so the free lists hold pages the host
//! backs. Both tools then run on memory in the same state, as on a machine without a balloon.

use std::fs;
use std::time::{Duration, Instant};

use crate::Result;

/// The module parameter that sets the smallest buddy order reported to the host.
const ORDER_PARAM: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// The kernel's reporting order with 4 KiB pages (`pageblock_order`).
const DEFAULT_ORDER: usize = 9;

/// Free page reporting paused; the old order is written back when this is dropped.
pub(crate) struct ReportingPause {
    old: String,
}

impl ReportingPause {
    /// Pauses reporting. `Ok(None)` when there is nothing to pause (no such parameter);
    /// an error when it exists but cannot be changed (not root, read-only sysfs).
    pub(crate) fn start() -> Result<Option<ReportingPause>> {
        let Ok(old) = fs::read_to_string(ORDER_PARAM) else {
            return Ok(None);
        };
        let buddy = fs::read_to_string("/proc/buddyinfo").unwrap_or_default();
        let above = orders(&buddy).unwrap_or(11);
        let old = value_to_restore(&old, above);
        fs::write(ORDER_PARAM, format!("{above}\n"))
            .map_err(|e| format!("writing {ORDER_PARAM}: {e}"))?;
        Ok(Some(ReportingPause { old }))
    }
}

impl Drop for ReportingPause {
    fn drop(&mut self) {
        if let Err(e) = fs::write(ORDER_PARAM, format!("{}\n", self.old)) {
            eprintln!(
                "warning: could not restore {ORDER_PARAM} to {}: {e}",
                self.old
            );
        }
    }
}

/// The order to put back at the end, given the value found (`old`) and the value that pauses
/// reporting (`above`, the number of buddy orders). A value at or above `above` was left by a
/// killed run: then the kernel's default, or reporting would stay off for good.
fn value_to_restore(old: &str, above: usize) -> String {
    let old = old.trim();
    if old.parse::<usize>().is_ok_and(|o| o >= above) {
        eprintln!(
            "warning: {ORDER_PARAM} was {old}, as a killed run leaves it; it will be set to \
             {DEFAULT_ORDER} at the end"
        );
        return DEFAULT_ORDER.to_string();
    }
    old.to_string()
}

/// The number of buddy orders (largest order + 1) from `/proc/buddyinfo`: the free-block counts
/// after `Node N, zone NAME`.
fn orders(buddyinfo: &str) -> Option<usize> {
    buddyinfo
        .lines()
        .map(|l| l.split_whitespace().skip(4).count())
        .max()
        .filter(|&n| n > 0)
}

/// Free memory in bytes (`MemFree` of `/proc/meminfo`).
pub(crate) fn mem_free() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    meminfo_bytes(&info, "MemFree:")
}

/// The value of `key` (`MemTotal:`, `MemFree:` ...) in `/proc/meminfo` text, in bytes.
pub(crate) fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Whether this machine is a VM whose virtio-balloon reports free pages to the host
/// (`VIRTIO_BALLOON_F_REPORTING`, feature bit 5). The host then discards memory the guest frees, and the
/// guest faults it back in on its next use: a buffered convert that writes GiBs into freshly allocated page
/// cache runs several times slower when the pages freed by the previous run's deleted output have been
/// reported in between (a matter of timing, so such rows turn bimodal for both tools alike).
pub(crate) fn free_page_reporting() -> bool {
    let Ok(devices) = fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon") else {
        return false;
    };
    devices.flatten().any(|d| {
        fs::read_to_string(d.path().join("features"))
            .map(|f| f.as_bytes().get(5) == Some(&b'1'))
            .unwrap_or(false)
    })
}

/// Touches `bytes` of fresh memory, one write per page, and frees it: afterwards the free lists hold that
/// much memory the host backs. Returns how long it took.
pub(crate) fn prefault(bytes: u64) -> Duration {
    let t = Instant::now();
    let Ok(n) = usize::try_from(bytes) else {
        return t.elapsed();
    };
    let mut v: Vec<u8> = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        return t.elapsed();
    }
    // One byte per 4 KiB page, through the spare capacity (no unsafe: nothing is read back).
    let spare = v.spare_capacity_mut();
    for i in (0..n).step_by(4096) {
        spare[i].write(1);
    }
    std::hint::black_box(&v);
    drop(v);
    t.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buddy_orders_are_counted() {
        let info = "Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      2 \n\
                    Node 0, zone    DMA32      4      3      2      5      4      4      3      3      3      2    640 \n";
        assert_eq!(orders(info), Some(11));
        assert_eq!(orders(""), None);
    }

    #[test]
    fn a_left_over_pause_is_not_restored() {
        assert_eq!(value_to_restore("9\n", 11), "9");
        assert_eq!(value_to_restore("11\n", 11), "9");
        assert_eq!(value_to_restore("12", 11), "9");
    }

    #[test]
    fn mem_free_is_read_in_bytes() {
        let info = "MemTotal:       24578044 kB\nMemFree:        17756548 kB\n";
        assert_eq!(meminfo_bytes(info, "MemFree:"), Some(17756548 * 1024));
        assert_eq!(meminfo_bytes("MemTotal: 1 kB\n", "MemFree:"), None);
    }

    #[test]
    fn prefault_touches_and_frees() {
        assert!(prefault(8 << 20) < Duration::from_secs(10));
    }
}
