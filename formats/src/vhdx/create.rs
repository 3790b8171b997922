//! Creating vhdx images: the `-o` options, the `Formatting` line and the layout QEMU 10
//! writes.
//!
//! Layout (as QEMU's): file identifier, two headers, two region tables in the first MiB;
//! the log at 1 MiB; the BAT after it (rounded to 1 MiB); 1 MiB of metadata after the BAT;
//! payload blocks from 5 MiB past the end of the BAT. Dynamic images end there; fixed
//! images are as long as their payload. With `block_state_zero` (the default) every BAT
//! entry says ZERO, also for fixed images, exactly as QEMU writes them.

use super::header::{
    self, metadata_table_bytes, new_guid, put32, put64, region_table_bytes, Header, MetaEntry,
    Region, BLOCK_SIZE_MAX, HEADER1_OFF, HEADER2_OFF, MIB, REGION1_OFF, REGION2_OFF,
};
use super::{bat_entries, state, BAT_OFFSET_MASK};
use crate::driver::{Action, CreateSpec};
use crate::error::{Error, Result};
use crate::file::FileLayer;
use crate::opts::{parse_bool, parse_size, OptKind, OptionDesc, OptionMap};

/// The vhdx create options, in QEMU's declaration order (the `Formatting` line's order).
pub static VHDX_OPTIONS: &[OptionDesc] = &[
    OptionDesc {
        name: "size",
        kind: OptKind::Size,
        help: "Virtual disk size; max of 64TB.",
    },
    OptionDesc {
        name: "log_size",
        kind: OptKind::Size,
        help: "Log size; min 1MB.",
    },
    OptionDesc {
        name: "block_size",
        kind: OptKind::Size,
        help: "Block Size; min 1MB, max 256MB. 0 means auto-calculate based on image size.",
    },
    OptionDesc {
        name: "subformat",
        kind: OptKind::Str,
        help: "VHDX format type, can be either 'dynamic' or 'fixed'. Default is 'dynamic'.",
    },
    OptionDesc {
        name: "block_state_zero",
        kind: OptKind::Bool,
        help: "Force use of payload blocks of type 'ZERO'. Non-standard, but default.  Do not set to 'off' when using 'qemu-img convert' with subformat=dynamic.",
    },
];

/// Largest virtual size (64 TiB).
const MAX_SIZE: u64 = 64 << 40;
/// The creator string QEMU writes into the file identifier.
const CREATOR: &str = "QEMU v10.0.2";

/// The `Formatting '...'` line: size, `log_size` and `block_size` always (with QEMU's
/// defaults), the other given options after them, then the file protocol's.
pub fn formatting_line(path: &str, size: u64, opts: &OptionMap) -> String {
    let mut s = format!("Formatting '{path}', fmt=vhdx size={size}");
    let size_of = |name: &str, default: &str| -> String {
        match opts.get(name) {
            Some(v) => parse_size(v, 1)
                .map(|n| (n as i64).to_string())
                .unwrap_or_else(|_| v.to_string()),
            None => default.to_string(),
        }
    };
    s.push_str(&format!(" log_size={}", size_of("log_size", "1048576")));
    s.push_str(&format!(" block_size={}", size_of("block_size", "0")));
    if let Some(v) = opts.get("subformat") {
        s.push_str(&format!(" subformat={}", v.replace(',', ",,")));
    }
    if let Some(v) = opts.get("block_state_zero") {
        s.push_str(&format!(" block_state_zero={v}"));
    }
    for d in crate::file::FILE_OPTIONS {
        let Some(v) = opts.get(d.name) else { continue };
        let v = match d.kind {
            OptKind::Size => parse_size(v, 1)
                .map(|n| (n as i64).to_string())
                .unwrap_or_else(|_| v.to_string()),
            OptKind::Str => v.replace(',', ",,"),
            _ => v.to_string(),
        };
        s.push_str(&format!(" {}={v}", d.name));
    }
    s
}

/// Validated create parameters.
struct Params {
    size: u64,
    log_size: u64,
    block_size: u64,
    fixed: bool,
    zero_blocks: bool,
}

/// A refused value, worded as QEMU words it (the CLI prefixes the file name).
fn invalid(msg: &str) -> Error {
    Error::InvalidArgument(msg.to_string())
}

/// Parse and check the options as QEMU does after the file exists (sizes rounded up to
/// 512 bytes and 1 MiB, `block_size=0` chosen from the size).
fn params(spec: &CreateSpec) -> Result<Params> {
    let o = &spec.options;
    let fixed = match o.get("subformat") {
        None | Some("dynamic") => false,
        Some("fixed") => true,
        Some(v) => {
            return Err(invalid(&format!(
                "Parameter 'subformat' does not accept value '{v}'"
            )))
        }
    };
    let zero_blocks = o
        .get("block_state_zero")
        .and_then(parse_bool)
        .unwrap_or(true);
    let sz = |name: &str| o.get(name).and_then(|v| parse_size(v, 1).ok());
    let size = spec.size.div_ceil(512).saturating_mul(512);
    let log_size = sz("log_size")
        .unwrap_or(MIB)
        .checked_next_multiple_of(MIB)
        .unwrap_or(u64::MAX);
    let mut block_size = sz("block_size")
        .map(|b| b.checked_next_multiple_of(MIB).unwrap_or(u64::MAX))
        .unwrap_or(0)
        .min(BLOCK_SIZE_MAX);
    if size > MAX_SIZE {
        return Err(invalid("Image size too large; max of 64TB"));
    }
    if log_size > u64::from(u32::MAX) {
        return Err(invalid("Log size must be smaller than 4 GB"));
    }
    if log_size < MIB {
        return Err(invalid("Log size must be a multiple of 1 MB"));
    }
    if block_size == 0 {
        block_size = if size > 32 << 40 {
            64 * MIB
        } else if size > 100 << 30 {
            32 * MIB
        } else if size > 1 << 30 {
            16 * MIB
        } else {
            8 * MIB
        };
    }
    if !block_size.is_power_of_two() {
        return Err(invalid("Block size must be a power of two"));
    }
    Ok(Params {
        size,
        log_size,
        block_size,
        fixed,
        zero_blocks,
    })
}

/// Create the image `spec` describes.
pub fn create(spec: &CreateSpec) -> Result<Vec<Action>> {
    let file = FileLayer::create(&spec.path)?;
    let p = params(spec)?;
    // (A) the file identifier with QEMU's creator string.
    let mut ident = b"vhdxfile".to_vec();
    for u in CREATOR.encode_utf16() {
        ident.extend_from_slice(&u.to_le_bytes());
    }
    file.write_all_at(&ident, 0, "vhdx file identifier")?;
    // (B), (C) the headers, sequence numbers n and n + 1.
    let mut h = Header {
        sequence_number: u64::from(u32::from_le_bytes(
            new_guid()[..4].try_into().unwrap_or([0; 4]),
        )),
        file_write_guid: new_guid(),
        data_write_guid: new_guid(),
        log_guid: [0; 16],
        log_version: 0,
        version: 1,
        log_length: p.log_size as u32,
        log_offset: MIB,
    };
    file.write_all_at(&h.to_bytes(&[]), HEADER1_OFF, "vhdx header 1")?;
    h.sequence_number += 1;
    file.write_all_at(&h.to_bytes(&[]), HEADER2_OFF, "vhdx header 2")?;
    // (G) the BAT.
    let chunk_ratio = header::SECTORS_PER_BITMAP * 512 / p.block_size;
    let entries = bat_entries(p.size, p.block_size, chunk_ratio);
    let bat_off = (MIB + p.log_size).next_multiple_of(MIB);
    let bat_len = (entries * 8).next_multiple_of(MIB);
    let md_off = (bat_off + bat_len).next_multiple_of(MIB);
    let data_off = bat_off + bat_len + 5 * MIB;
    let end = if p.fixed { data_off + p.size } else { data_off };
    file.set_len(end)?;
    if p.fixed || p.zero_blocks || file.is_block_device() {
        let st = if p.zero_blocks {
            state::ZERO
        } else if p.fixed {
            state::FULLY_PRESENT
        } else {
            state::NOT_PRESENT
        };
        let mut bat = vec![0u8; bat_len as usize];
        let blocks = p.size.div_ceil(p.block_size);
        for b in 0..blocks {
            let i = b + b / chunk_ratio;
            let off = if st == state::FULLY_PRESENT {
                (data_off + b * p.block_size).next_multiple_of(MIB) & BAT_OFFSET_MASK
            } else {
                0
            };
            put64(&mut bat, (i * 8) as usize, off | st);
        }
        file.write_all_at(&bat, bat_off, "vhdx BAT")?;
    }
    // (D), (E) the region tables (QEMU marks neither region required).
    let regions = [
        Region {
            guid: header::BAT_GUID,
            file_offset: bat_off,
            length: bat_len as u32,
            required: false,
        },
        Region {
            guid: header::METADATA_GUID,
            file_offset: md_off,
            length: MIB as u32,
            required: false,
        },
    ];
    let rt = region_table_bytes(&regions);
    file.write_all_at(&rt, REGION1_OFF, "vhdx region table 1")?;
    file.write_all_at(&rt, REGION2_OFF, "vhdx region table 2")?;
    // (H) the metadata: table, then the five items from 64 KiB on.
    let items: [(header::Guid, u32, u32); 5] = [
        (header::FILE_PARAMS_GUID, 8, 4),
        (header::VIRTUAL_SIZE_GUID, 8, 6),
        (header::PAGE83_GUID, 16, 6),
        (header::LOGICAL_SECTOR_GUID, 4, 6),
        (header::PHYSICAL_SECTOR_GUID, 4, 6),
    ];
    let mut off = 64 << 10;
    let mut table = Vec::new();
    for (item, length, flags) in items {
        table.push(MetaEntry {
            item,
            offset: off,
            length,
            flags,
        });
        off += length;
    }
    file.write_all_at(&metadata_table_bytes(&table), md_off, "vhdx metadata table")?;
    let mut data = vec![0u8; 40];
    put32(&mut data, 0, p.block_size as u32);
    put32(&mut data, 4, u32::from(p.fixed));
    put64(&mut data, 8, p.size);
    data[16..32].copy_from_slice(&new_guid());
    put32(&mut data, 32, 512);
    put32(&mut data, 36, 512);
    file.write_all_at(&data, md_off + (64 << 10), "vhdx metadata items")?;
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_line_like_qemu() {
        assert_eq!(
            formatting_line("a.vhdx", 67108864, &OptionMap::default()),
            "Formatting 'a.vhdx', fmt=vhdx size=67108864 log_size=1048576 block_size=0"
        );
        let o = OptionMap::parse("block_state_zero=off,subformat=fixed,block_size=1M,log_size=1M");
        assert_eq!(
            formatting_line("b.vhdx", 8388608, &o),
            "Formatting 'b.vhdx', fmt=vhdx size=8388608 log_size=1048576 block_size=1048576 subformat=fixed block_state_zero=off"
        );
    }
}
