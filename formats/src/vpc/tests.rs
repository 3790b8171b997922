//! Unit tests of the vpc driver: create, open and map round trips (the differential tests
//! against qemu-img are in `tests/vpc.rs`).

use super::*;
use crate::driver::{Access, CreateSpec};
use crate::file::FileOpen;

fn create(dir: &std::path::Path, name: &str, size: u64, opts: &str) -> String {
    let path = dir.join(name).to_str().unwrap().to_string();
    VPC.create(&CreateSpec {
        path: path.clone(),
        size,
        options: OptionMap::parse(opts),
    })
    .unwrap();
    path
}

fn open(path: &str, access: Access) -> Box<dyn Image> {
    let o = OpenOptions::new(access);
    let f = Arc::new(FileLayer::open(path, &o.file_open()).unwrap());
    VPC.open(f, &o).unwrap()
}

#[test]
fn dynamic_disk_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "d.vhd", 1 << 30, "");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 4608);
    let img = open(&p, Access::Read);
    assert_eq!(img.virtual_size(), 1_073_995_776);
    assert_eq!(img.cluster_size(), Some(2 << 20));
    let mut v = Vec::new();
    img.map(GuestOff(0), u64::MAX, &mut v).unwrap();
    assert_eq!(
        v,
        vec![Extent::Zero {
            len: 1_073_995_776,
            explicit: true,
            at: None
        }]
    );
}

#[test]
fn dynamic_writer_allocates_blocks_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "d.vhd", 9 << 20, "force_size=on");
    let img = open(&p, Access::Write);
    let mut w = img.writer().unwrap();
    let mut pl = Vec::new();
    let t = w.allocate(GuestOff(5 << 20), 4096, &mut pl).unwrap();
    w.commit(&[t]).unwrap();
    w.close().unwrap();
    // BAT of 5 entries (one 512-byte sector) at 1536; the first block's bitmap at 2048.
    assert_eq!(pl[0].host, HostOff(2048 + 512 + (1 << 20)));
    let img = open(&p, Access::Read);
    let mut v = Vec::new();
    img.map(GuestOff(4 << 20), 2 << 20, &mut v).unwrap();
    assert_eq!(
        v,
        vec![Extent::Data {
            file: FileId(0),
            host: HostOff(2560),
            len: 2 << 20
        }]
    );
    // The trailing footer follows the block.
    let len = std::fs::metadata(&p).unwrap().len();
    assert_eq!(len, 2048 + 512 + (2 << 20) + 512);
}

#[test]
fn bad_footers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "d.vhd", 1 << 20, "");
    let mut b = std::fs::read(&p).unwrap();
    b[40] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let o = OpenOptions::new(Access::Read);
    let f = Arc::new(FileLayer::open(&p, &FileOpen::read_only()).unwrap());
    let e = VPC.open(f, &o).err().unwrap();
    assert!(e.to_string().ends_with("Incorrect header checksum"), "{e}");
}
