//! vmdk create options (`-o`), as qemu-img 10 lists them, and the `Formatting '...'` line.

use crate::opts::{parse_size, OptKind, OptionDesc, OptionMap};

/// Every vmdk create option, in the order qemu declares them (also the `Formatting` order).
pub static VMDK_OPTIONS: &[OptionDesc] = &[
    OptionDesc {
        name: "size",
        kind: OptKind::Size,
        help: "Virtual disk size",
    },
    OptionDesc {
        name: "adapter_type",
        kind: OptKind::Str,
        help: "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    },
    OptionDesc {
        name: "backing_file",
        kind: OptKind::Str,
        help: "File name of a base image",
    },
    OptionDesc {
        name: "backing_fmt",
        kind: OptKind::Str,
        help: "Must be 'vmdk' if present",
    },
    OptionDesc {
        name: "compat6",
        kind: OptKind::Bool,
        help: "VMDK version 6 image",
    },
    OptionDesc {
        name: "hwversion",
        kind: OptKind::Str,
        help: "VMDK hardware version",
    },
    OptionDesc {
        name: "toolsversion",
        kind: OptKind::Str,
        help: "VMware guest tools version",
    },
    OptionDesc {
        name: "subformat",
        kind: OptKind::Str,
        help: "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    },
    OptionDesc {
        name: "zeroed_grain",
        kind: OptKind::Bool,
        help: "Enable efficient zero writes using the zeroed-grain GTE feature",
    },
];

/// Defaults qemu prints when an option was not given.
fn default_of(name: &str) -> Option<&'static str> {
    match name {
        "compat6" => Some("off"),
        "hwversion" => Some("undefined"),
        _ => None,
    }
}

/// The `Formatting '...'` line qemu-img prints before creating a vmdk image (without the
/// newline): `size`, then the vmdk options in declaration order (`compat6` and `hwversion`
/// always, with their defaults), then the `file` protocol's, each as given (strings with
/// commas doubled, sizes as parsed).
pub fn formatting_line(path: &str, size: u64, opts: &OptionMap) -> String {
    let mut s = format!("Formatting '{path}', fmt=vmdk size={}", size as i64);
    let all = VMDK_OPTIONS
        .iter()
        .filter(|d| d.name != "size")
        .chain(crate::file::FILE_OPTIONS);
    for d in all {
        let text = match (opts.get(d.name), default_of(d.name)) {
            (Some(v), _) => match d.kind {
                OptKind::Size => match parse_size(v, 1) {
                    Ok(n) => (n as i64).to_string(),
                    Err(_) => v.to_string(),
                },
                OptKind::Str => v.replace(',', ",,"),
                _ => v.to_string(),
            },
            (None, Some(def)) => def.to_string(),
            (None, None) => continue,
        };
        s.push(' ');
        s.push_str(d.name);
        s.push('=');
        s.push_str(&text);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_like_qemu() {
        let o = OptionMap::parse(
            "zeroed_grain=on,adapter_type=lsilogic,subformat=streamOptimized,hwversion=7,toolsversion=10,nocow=on,extent_size_hint=1M",
        );
        assert_eq!(
            formatting_line("x.vmdk", 1 << 30, &o),
            "Formatting 'x.vmdk', fmt=vmdk size=1073741824 adapter_type=lsilogic compat6=off hwversion=7 toolsversion=10 subformat=streamOptimized zeroed_grain=on nocow=on extent_size_hint=1048576"
        );
        assert_eq!(
            formatting_line("y.vmdk", 5, &OptionMap::default()),
            "Formatting 'y.vmdk', fmt=vmdk size=5 compat6=off hwversion=undefined"
        );
    }
}
