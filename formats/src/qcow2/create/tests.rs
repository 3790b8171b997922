//! Differential tests: every image is created by the real qemu-img and by rimg with the
//! same options at the same path, and must be byte-identical, pass `qemu-img check` and
//! give the same `qemu-img info --output=json` (apart from allocation sizes).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use super::*;
use crate::opts::OptionMap;

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipping: qemu-img is not installed");
    }
    ok
}

/// `qemu-img info --output=json` without the host allocation sizes and file names.
fn info(path: &Path) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("actual-size");
                m.remove("filename");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    strip(&mut v);
    v
}

/// What the engine does with the actions: write the zeros.
fn run_actions(img: &Path, data: &Path, actions: &[Action]) {
    for a in actions {
        let Action::WriteZeroes { file, host, len } = a else {
            panic!("unexpected action {a:?}");
        };
        let path = if file.0 == 0 { img } else { data };
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < *len {
            let n = (*len - done).min(zeros.len() as u64);
            f.write_all_at(&zeros[..n as usize], host.0 + done).unwrap();
            done += n;
        }
    }
}

/// The runs of `f` that may hold data (SEEK_DATA/SEEK_HOLE).
fn data_runs(f: &FileLayer) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut off = 0;
    while let Some((s, e)) = f.next_data(off).unwrap() {
        runs.push((s, e));
        off = e;
    }
    runs
}

/// Byte-compare two (possibly huge, sparse) files, reading only where either has data.
fn assert_same_bytes(what: &str, a: &Path, b: &Path) {
    let open = |p: &Path| {
        FileLayer::open(
            p.to_str().unwrap(),
            &crate::file::FileOpen {
                lock: false,
                ..crate::file::FileOpen::read_only()
            },
        )
        .unwrap()
    };
    let (fa, fb) = (open(a), open(b));
    let (la, lb) = (fa.len().unwrap(), fb.len().unwrap());
    assert_eq!(la, lb, "{what}: rimg's file length differs from qemu-img's");
    let mut runs = data_runs(&fa);
    runs.extend(data_runs(&fb));
    runs.sort_unstable();
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut done = 0;
    for (s, e) in runs {
        let mut off = s.max(done);
        while off < e {
            let n = ((e - off) as usize).min(x.len());
            fa.read_exact_at(&mut x[..n], off, "rimg image").unwrap();
            fb.read_exact_at(&mut y[..n], off, "qemu image").unwrap();
            if let Some(i) = x[..n].iter().zip(&y[..n]).position(|(p, q)| p != q) {
                panic!(
                    "{what}: rimg's file differs from qemu-img's at offset {:#x}",
                    off + i as u64
                );
            }
            off += n as u64;
        }
        done = done.max(e);
    }
}

/// Create with qemu-img and with rimg (`@D` in `opts` stands for the data file path) and
/// compare.
fn same_as_qemu(opts: &str, size: &str) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    let data = dir.path().join("t.data");
    let o = opts.replace("@D", data.to_str().unwrap());
    // qemu-img check opens the backing file: make one.
    let m = OptionMap::parse(&o);
    if let (Some(b), Some(f)) = (m.get("backing_file"), m.get("backing_fmt")) {
        let path = dir.path().join(b);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", f])
            .arg(&path)
            .arg("1M")
            .status()
            .unwrap();
        assert!(st.success());
    }
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-u", "-f", "qcow2"]);
    if !o.is_empty() {
        cmd.args(["-o", &o]);
    }
    let out = cmd.arg(&img).arg(size).output().unwrap();
    let spec = CreateSpec {
        path: img.to_str().unwrap().to_string(),
        size: crate::opts::parse_size(size, 1).unwrap(),
        options: OptionMap::parse(&o),
    };
    if !out.status.success() {
        // Then rimg must fail the same way and leave no files either.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let prefix = format!("qemu-img: {}: ", img.display());
        let want = stderr.trim_end().strip_prefix(&prefix).unwrap_or(&stderr);
        let e = create(&spec).expect_err(&format!("rimg create -o {o} {size} succeeded"));
        assert_eq!(e.to_string(), want, "-o {o} {size}");
        assert!(!img.exists() && !data.exists());
        return;
    }
    let want_info = info(&img);
    let qimg = dir.path().join("q.qcow2");
    let qdata = dir.path().join("q.data");
    std::fs::rename(&img, &qimg).unwrap();
    let has_data = data.exists();
    if has_data {
        std::fs::rename(&data, &qdata).unwrap();
    }

    let actions = create(&spec).unwrap_or_else(|e| panic!("rimg create -o {o} {size}: {e}"));
    run_actions(&img, &data, &actions);
    assert_same_bytes(&format!("-o {o} {size}"), &img, &qimg);
    assert_eq!(data.exists(), has_data);
    if has_data {
        assert_same_bytes(&format!("data file of -o {o} {size}"), &data, &qdata);
    }
    let check = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "qemu-img check after -o {o} {size}: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(info(&img), want_info, "-o {o} {size}");
}

#[test]
fn plain_images_are_byte_identical() {
    if !have_qemu_img() {
        return;
    }
    for (o, size) in [
        ("", "0"),
        ("", "1000"),
        ("", "1M"),
        ("", "10G"),
        ("", "2P"),
        ("", "3P"),
        ("cluster_size=512", "129G"),
        ("cluster_size=2M", "7E"),
        ("cluster_size=512", "0"),
        ("cluster_size=512", "1G"),
        ("cluster_size=4k", "1M"),
        ("cluster_size=2M", "1T"),
        ("cluster_size=16k,extended_l2=on", "5G"),
        ("refcount_bits=1", "1M"),
        ("refcount_bits=8,lazy_refcounts=on", "100M"),
        ("compat=0.10", "1M"),
        ("compat=v2,cluster_size=4k", "20M"),
        ("compression_type=zstd,compat=v3", "1M"),
        ("nocow=on,extent_size_hint=1M", "1M"),
    ] {
        same_as_qemu(o, size);
    }
}

#[test]
fn refcount_table_growth_is_byte_identical() {
    if !have_qemu_img() {
        return;
    }
    for (o, size) in [
        // The L1 table outgrows the first refcount table.
        ("cluster_size=512", "40G"),
        ("cluster_size=512,refcount_bits=64", "16G"),
        ("cluster_size=1k,refcount_bits=32", "60G"),
        // Preallocation interleaving refcount blocks with L2 tables and data.
        (
            "cluster_size=512,refcount_bits=64,preallocation=metadata",
            "24M",
        ),
        (
            "cluster_size=512,refcount_bits=8,preallocation=metadata",
            "20M",
        ),
        (
            "cluster_size=512,refcount_bits=64,preallocation=falloc",
            "8M",
        ),
        ("cluster_size=512,refcount_bits=16,preallocation=full", "3M"),
        (
            "cluster_size=4k,refcount_bits=64,preallocation=metadata",
            "100M",
        ),
        (
            "cluster_size=2k,refcount_bits=64,preallocation=falloc,lazy_refcounts=on",
            "9M",
        ),
    ] {
        same_as_qemu(o, size);
    }
}

#[test]
fn preallocated_images_are_byte_identical() {
    if !have_qemu_img() {
        return;
    }
    for (o, size) in [
        ("preallocation=off", "1M"),
        ("preallocation=metadata", "0"),
        ("preallocation=metadata", "10M"),
        ("preallocation=metadata", "1049088"),
        ("preallocation=metadata", "1G"),
        ("preallocation=metadata,extended_l2=on", "1049088"),
        ("preallocation=metadata,cluster_size=2M", "5G"),
        ("preallocation=metadata,compat=0.10", "3M"),
        ("preallocation=falloc", "0"),
        ("preallocation=falloc", "10M"),
        ("preallocation=falloc", "1049088"),
        (
            "preallocation=falloc,extended_l2=on,cluster_size=32k",
            "700M",
        ),
        ("preallocation=full", "1049088"),
        ("preallocation=full,cluster_size=4k,refcount_bits=2", "5M"),
    ] {
        same_as_qemu(o, size);
    }
}

#[test]
fn data_files_and_backing_files_are_byte_identical() {
    if !have_qemu_img() {
        return;
    }
    for (o, size) in [
        ("data_file=@D", "0"),
        ("data_file=@D", "1M"),
        ("data_file=@D", "1049088"),
        ("data_file=@D,data_file_raw=on", "10M"),
        ("data_file=@D,data_file_raw=on", "1049088"),
        (
            "data_file=@D,preallocation=metadata,extended_l2=on",
            "1049088",
        ),
        ("data_file=@D,preallocation=falloc", "3M"),
        ("data_file=@D,preallocation=full", "3M"),
        ("data_file=@D,preallocation=full", "1049088"),
        ("data_file=@D,cluster_size=512,preallocation=metadata", "9M"),
        ("backing_file=base.img,backing_fmt=raw", "1M"),
        (
            "backing_file=../some/where/base.qcow2,backing_fmt=qcow2,compat=0.10",
            "1G",
        ),
        ("backing_file=b,,c,backing_fmt=qcow2", "1M"),
        ("backing_file=b,backing_fmt=vmdk", "2M"),
        (
            "backing_file=b,backing_fmt=raw,cluster_size=512,refcount_bits=1",
            "1M",
        ),
        (
            "backing_file=b,backing_fmt=raw,extended_l2=on,preallocation=metadata",
            "3M",
        ),
        (
            "backing_file=b,backing_fmt=raw,extended_l2=on,preallocation=full",
            "1M",
        ),
        (
            "backing_file=b,backing_fmt=vmdk,data_file=@D,lazy_refcounts=on",
            "1M",
        ),
    ] {
        same_as_qemu(o, size);
    }
}

#[test]
fn full_preallocation_is_left_to_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.qcow2");
    let spec = CreateSpec {
        path: img.to_str().unwrap().to_string(),
        size: 10 << 20,
        options: OptionMap::parse("preallocation=full"),
    };
    let actions = create(&spec).unwrap();
    // header, refcount block, L1, new refcount table; then the data
    assert_eq!(
        actions,
        vec![Action::WriteZeroes {
            file: FileId(0),
            host: HostOff(5 << 16),
            len: 10 << 20
        }]
    );
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 165 << 16);
}

#[test]
fn failed_creates_leave_files_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    let data = dir.path().join("x.data");
    let spec = |o: &str| CreateSpec {
        path: img.to_str().unwrap().to_string(),
        size: 1 << 20,
        options: OptionMap::parse(&o.replace("@D", data.to_str().unwrap())),
    };
    // A syntax error touches nothing.
    std::fs::write(&img, b"keep").unwrap();
    let e = create(&spec("lazy_refcounts=maybe")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Parameter 'lazy_refcounts' expects 'on' or 'off'"
    );
    assert_eq!(std::fs::read(&img).unwrap(), b"keep");
    // A bad value or combination deletes what qemu-img had already created.
    let e = create(&spec("cluster_size=3k")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Cluster size must be a power of two between 512 and 2048k"
    );
    assert!(!img.exists());
    std::fs::write(&data, b"old").unwrap();
    let e = create(&spec("data_file=@D,compat=0.10")).unwrap_err();
    assert!(e.to_string().starts_with("External data files"), "{e}");
    assert!(!img.exists() && !data.exists());
    let e = create(&CreateSpec {
        size: 3 << 50,
        ..spec("")
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    );
    assert!(!img.exists());
    // Backing file names must fit in the header cluster.
    let long = "a".repeat(400);
    let e = create(&spec(&format!(
        "cluster_size=512,backing_file={long},backing_fmt=raw"
    )))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "Could not assign backing file '{long}' with format 'raw': No space left on device"
        )
    );
    let long = "a".repeat(1024);
    let e = create(&spec(&format!("backing_file={long},backing_fmt=raw"))).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Could not assign backing file '{long}' with format 'raw': Invalid argument")
    );
    assert!(!img.exists());
    let e = create(&spec("data_file=")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Could not create '': No such file or directory"
    );
    assert!(!img.exists());
}

/// A wider sweep over random option combinations (slow; run with `--ignored`).
#[test]
#[ignore]
fn random_combinations_are_byte_identical() {
    if !have_qemu_img() {
        return;
    }
    let mut seed: u64 = std::env::var("RIMG_SWEEP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let mut next = |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed ^ (seed >> 31).rotate_left(17)) % n
    };
    let cases: u64 = std::env::var("RIMG_SWEEP_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    for _ in 0..cases {
        let cb = 9 + next(13) as u32;
        let order = next(7) as u32;
        let extl2 = cb >= 14 && next(3) == 0;
        let prealloc = ["off", "metadata", "falloc", "full"][next(4) as usize];
        let data = next(4) == 0;
        let cs = 1u64 << cb;
        // keep preallocated data small and L1 tables reasonable
        let max = if prealloc == "off" {
            // up to the largest L1 table qemu allows
            (cs * cs / if extl2 { 16 } else { 8 }) << 22
        } else {
            48 << 20
        };
        let size = (next(max.min(1 << 50)) / 512 * 512) + [0, 512, cs][next(3) as usize];
        let mut o = format!(
            "cluster_size={cs},refcount_bits={},preallocation={prealloc}",
            1 << order
        );
        if extl2 {
            o.push_str(",extended_l2=on");
        }
        if data {
            o.push_str(",data_file=@D");
        }
        eprintln!("sweep: -o {o} {size}");
        same_as_qemu(&o, &size.to_string());
    }
}
