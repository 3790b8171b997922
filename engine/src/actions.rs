//! Host actions outside a copy: preallocation zeros for `create` and `resize`.

use std::sync::Arc;

use rimg_formats::{Action, Image};

use crate::copy::ActionWork;
use crate::files::{CacheMode, JobFiles};
use crate::shard::Pool;
use crate::{Engine, Error, Result};

/// Most bytes one action unit covers, so large preallocations spread over the shards.
const ACTION_CHUNK: u64 = 64 << 20;

/// Perform `actions` on the files of `image` (opened for writing), then fsync them.
pub fn run(engine: &Engine, image: &dyn Image, actions: &[Action]) -> Result<()> {
    if actions.is_empty() {
        return Ok(());
    }
    let mut files = JobFiles::default();
    let mut idx = Vec::new();
    for f in image.files() {
        let i = files.add(engine, f, true, CacheMode::Writeback)?;
        files.mark_written(i);
        idx.push(i);
    }
    let files = Arc::new(files);
    let mut pool = Pool::start(engine, files.clone(), usize::MAX, 1)?;
    let mut id = 0;
    let mut sent = 0;
    for a in actions {
        for piece in split(a) {
            pool.send(Box::new(ActionWork::new(id, 0, &[piece], &idx)));
            id += 1;
            sent += 1;
        }
    }
    let mut err = None;
    for _ in 0..sent {
        match pool.results.recv() {
            Ok(o) => {
                if let Err(e) = o.result {
                    err.get_or_insert(e);
                }
            }
            Err(_) => {
                err.get_or_insert(Error::Setup("shards stopped unexpectedly".into()));
                break;
            }
        }
    }
    pool.join();
    if let Some(e) = err {
        return Err(e);
    }
    files.flush()
}

fn split(a: &Action) -> Vec<Action> {
    let (file, host, len) = match a {
        Action::PunchHole { file, host, len }
        | Action::ZeroRange { file, host, len }
        | Action::WriteZeroes { file, host, len } => (*file, *host, *len),
    };
    let mut v = Vec::new();
    let mut done = 0;
    while done < len {
        let n = ACTION_CHUNK.min(len - done);
        let h = host.plus(done);
        v.push(match a {
            Action::PunchHole { .. } => Action::PunchHole {
                file,
                host: h,
                len: n,
            },
            Action::ZeroRange { .. } => Action::ZeroRange {
                file,
                host: h,
                len: n,
            },
            Action::WriteZeroes { .. } => Action::WriteZeroes {
                file,
                host: h,
                len: n,
            },
        });
        done += n;
    }
    v
}
