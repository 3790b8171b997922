//! The qcow2 internal snapshot table: parsed at open (bounded by the file size and QEMU's
//! limits) for `info`, `snapshot -l` and reading a snapshot (`convert -l`).

use super::header::Header;
use crate::driver::SnapshotInfo;
use crate::error::{Error, Result};
use crate::file::FileLayer;

/// QEMU's limit on the number of snapshots.
const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on a snapshot entry's extra data.
const MAX_EXTRA: u32 = 1024;

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// Read the snapshot table of an image.
pub(super) fn read_table(file: &FileLayer, h: &Header) -> Result<Vec<SnapshotInfo>> {
    let path = file.path();
    let bad = |what: String| Error::Corrupt {
        path: path.to_string(),
        what,
    };
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(bad(format!("Too many snapshots ({})", h.nb_snapshots)));
    }
    let file_len = file.len()?;
    let mut off = h.snapshots_offset;
    let mut out = Vec::with_capacity(h.nb_snapshots as usize);
    for i in 0..h.nb_snapshots {
        if off.checked_add(40).is_none_or(|e| e > file_len) {
            return Err(bad(format!(
                "snapshot table entry {i} is past the end of the file"
            )));
        }
        let mut fixed = [0u8; 40];
        file.read_exact_at(&mut fixed, off, "snapshot table")?;
        let l1_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        let id_len = u64::from(be16(&fixed, 12));
        let name_len = u64::from(be16(&fixed, 14));
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA {
            return Err(bad(format!("snapshot {i}: too much extra data")));
        }
        let var_len = u64::from(extra_len) + id_len + name_len;
        if (off + 40).checked_add(var_len).is_none_or(|e| e > file_len) {
            return Err(bad(format!("snapshot {i} is past the end of the file")));
        }
        let mut var = vec![0u8; var_len as usize];
        file.read_exact_at(&mut var, off + 40, "snapshot table")?;
        let extra = &var[..extra_len as usize];
        let mut vm_state_size = u64::from(be32(&fixed, 32));
        let mut disk_size = h.size;
        let mut icount = None;
        if extra.len() >= 8 {
            vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            disk_size = be64(extra, 8);
        }
        if extra.len() >= 24 {
            let v = be64(extra, 16);
            icount = (v != u64::MAX).then_some(v);
        }
        let e = extra_len as usize;
        let id = String::from_utf8_lossy(&var[e..e + id_len as usize]).into_owned();
        let n0 = e + id_len as usize;
        let name = String::from_utf8_lossy(&var[n0..n0 + name_len as usize]).into_owned();
        if !l1_offset.is_multiple_of(h.cluster_size())
            || u64::from(l1_size) * 8 > 32 << 20
            || l1_offset
                .checked_add(u64::from(l1_size) * 8)
                .is_none_or(|e| e > file_len)
        {
            return Err(bad(format!("snapshot '{name}': invalid L1 table")));
        }
        out.push(SnapshotInfo {
            id,
            name,
            vm_state_size,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            icount,
            disk_size,
            l1_offset,
            l1_size,
        });
        off += (40 + var_len).div_ceil(8) * 8;
    }
    Ok(out)
}

/// Find a snapshot as `qemu-img convert -l` does: `snapshot.id=ID[,snapshot.name=NAME]`,
/// `snapshot.name=NAME`, or a bare string matching an id, then a name.
pub(super) fn select<'a>(snaps: &'a [SnapshotInfo], sel: &str) -> Option<&'a SnapshotInfo> {
    if sel.contains('=') {
        let m = crate::opts::OptionMap::parse(sel);
        let id = m.get("snapshot.id");
        let name = m.get("snapshot.name");
        return snaps.iter().find(|s| {
            id.is_none_or(|i| s.id == i)
                && name.is_none_or(|n| s.name == n)
                && (id.is_some() || name.is_some())
        });
    }
    snaps
        .iter()
        .find(|s| s.id == sel)
        .or_else(|| snaps.iter().find(|s| s.name == sel))
}
