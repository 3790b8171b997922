//! Backing chains three deep, of qcow2 over raw and qcow2, with subclusters, small
//! clusters, v2 layers and a probed base.

use super::*;

// ---------------------------------------------------------------------------------------------
// Backing chains

/// How the three layers of a chain are made.
struct ChainSpec {
    /// `-o` options of the middle layer
    mid_opts: &'static str,
    /// `-o` options of the top layer
    top_opts: &'static str,
    /// cluster size of the top layer
    top_cluster: u64,
    /// write `backing_fmt` into the middle layer's header (else qemu probes the base)
    mid_backing_fmt: bool,
}

/// s/top.qcow2 → s/sub/mid.qcow2 (named `sub/mid.qcow2`) → s/sub/base.raw (named `base.raw`),
/// each layer shorter than the one above it.
fn build_chain(s: &Dir, spec: &ChainSpec) {
    s.mkdir("sub");
    let base_len = 5 * M + 512;
    s.patterned(
        "sub/base.raw",
        base_len,
        &[(0xb1, 0, M), (0xb2, 2 * M, M), (0xb3, 4 * M, M + 512)],
    );
    let sub = Dir::at(s.join("sub"));
    create_overlay(&sub, "mid.qcow2", spec.mid_opts, "base.raw", "raw", 8 * M);
    if !spec.mid_backing_fmt {
        // qemu-img no longer writes an image without one: hide the backing format extension
        // behind a magic nobody knows (unknown extensions are skipped)
        let ext = header_extension(&sub, "mid.qcow2", 0xe279_2aca)
            .expect("mid.qcow2 has a backing format extension");
        set_be32(&sub, "mid.qcow2", ext, 0x0bad_f00d);
    }
    let mid_cmds: Vec<String> = vec![
        "write -P 0xa1 1M 64k".into(),
        // zeroes hiding base data in the middle layer
        format!("write -z {} {}", 2 * M, 128 * K),
        // an unaligned write over base data (copy-on-write from the base)
        format!("write -P 0xa2 {} 1000", 2 * M + 512 * K + 3),
        // beyond the end of the base
        format!("write -P 0xa3 {} {M}", 6 * M),
        // over the base's unaligned end
        format!("write -P 0xa4 {} 4096", 5 * M),
    ];
    qemu_io(&sub, "qcow2", "mid.qcow2", &mid_cmds).assert_ok();
    create_overlay(
        s,
        "top.qcow2",
        spec.top_opts,
        "sub/mid.qcow2",
        "qcow2",
        12 * M + 512,
    );
    let top_cmds: Vec<String> = vec![
        // a partial cluster over base data
        "write -P 0x71 0 4k".into(),
        // zeroes hiding base data in the top layer
        format!("write -z {} {}", 4 * M, 64 * K),
        // beyond the middle layer's end
        format!("write -P 0x72 {} {}", 9 * M, 64 * K),
        // a subcluster-sized write over middle-layer data
        format!("write -P 0x74 {} 2048", 6 * M + 4096),
        // the last bytes
        format!("write -P 0x73 {} 100", 12 * M + 412),
    ];
    qemu_io(s, "qcow2", "top.qcow2", &top_cmds).assert_ok();
    let run = qemu_io(
        s,
        "qcow2",
        "top.qcow2",
        &[format!(
            "write -c -P 0x75 {} {}",
            10 * M,
            spec.top_cluster.max(128 * K)
        )],
    );
    if !run.ok() {
        skip(&format!(
            "top.qcow2: compressed write refused\n{}",
            run.describe()
        ));
    }
}

fn check_chain(spec: ChainSpec) {
    let twin = Twin::new();
    build_chain(&twin.s, &spec);
    let mut c = Checks::new();
    let before = shared_states(&twin);
    check_readable(&mut c, &twin, "top.qcow2", Some("sub/mid.qcow2"));
    check_readable(&mut c, &twin, "sub/mid.qcow2", Some("sub/base.raw"));
    // the chain seen from the middle layer's directory, and the base against the top
    let sub = Dir::at(twin.s.join("sub"));
    for args in [
        vec!["info", "--backing-chain", "mid.qcow2"],
        vec!["map", "--output=json", "mid.qcow2"],
        vec!["compare", "base.raw", "../top.qcow2"],
        vec!["compare", "-F", "qcow2", "base.raw", "../top.qcow2"],
    ] {
        c.same(&sub.both(&args));
    }
    shared_unchanged(&mut c, &twin, &before, "the commands above");
    c.finish();
}

#[test]
fn qcow2_chain_three_deep() {
    check_chain(ChainSpec {
        mid_opts: "",
        top_opts: "",
        top_cluster: 64 * K,
        mid_backing_fmt: true,
    });
}

#[test]
fn qcow2_chain_subclusters_and_small_clusters() {
    check_chain(ChainSpec {
        mid_opts: "cluster_size=4k,compression_type=zstd",
        top_opts: "extended_l2=on,cluster_size=128k",
        top_cluster: 128 * K,
        mid_backing_fmt: true,
    });
}

#[test]
fn qcow2_chain_v2_middle_probed_base() {
    check_chain(ChainSpec {
        mid_opts: "compat=0.10,cluster_size=512",
        top_opts: "cluster_size=2M",
        top_cluster: 2 * M,
        mid_backing_fmt: false,
    });
}
