//! The block device: a host file, read and written in 512-byte sectors, in batches.

use crate::memory::GuestMem;
use crate::{error::io, Result};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use vmm_abi::{BlockDesc, BlockRequest, BLOCK_FLUSH, BLOCK_IO_ERROR, BLOCK_MAX_DESCS, BLOCK_OK, BLOCK_READ, BLOCK_WRITE, SECTOR_SIZE};

/// A disk backed by a file (its size rounded down to whole sectors).
pub struct Block {
    file: File,
    path: PathBuf,
    sectors: u64,
}

impl Block {
    /// Opens `path` read-write.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io("cannot open disk", path))?;
        let len = file.metadata().map_err(io("cannot stat disk", path))?.len();
        Ok(Block { file, path: path.to_owned(), sectors: len / SECTOR_SIZE })
    }

    /// Size in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Handles one [`BlockRequest`] at `addr`. Host I/O errors become `BLOCK_IO_ERROR` for the
    /// guest; ABI violations are `Err`.
    pub fn request(&mut self, mem: &mut GuestMem, addr: u64) -> Result<(), String> {
        let req: BlockRequest = mem.read_obj(addr)?;
        if req.count > BLOCK_MAX_DESCS {
            return Err(format!("block request with {} descriptors (at most {BLOCK_MAX_DESCS})", req.count));
        }
        let mut status = BLOCK_OK;
        let mut buf = Vec::new();
        for i in 0..req.count as u64 {
            let d: BlockDesc = mem.read_obj(req.descs + i * std::mem::size_of::<BlockDesc>() as u64)?;
            if d.op == BLOCK_FLUSH {
                if self.file.sync_data().is_err() {
                    status = BLOCK_IO_ERROR;
                }
                continue;
            }
            let end = d.sector.checked_add(d.sectors as u64).filter(|e| *e <= self.sectors);
            if end.is_none() {
                return Err(format!("block descriptor {i}: sectors {}+{} beyond the disk ({} sectors)", d.sector, d.sectors, self.sectors));
            }
            let len = d.sectors as u64 * SECTOR_SIZE;
            mem.check(d.buf, len).map_err(|e| format!("block descriptor {i}: buffer {e}"))?;
            buf.resize(len as usize, 0);
            let off = d.sector * SECTOR_SIZE;
            match d.op {
                BLOCK_READ => {
                    if self.file.read_exact_at(&mut buf, off).is_err() {
                        status = BLOCK_IO_ERROR;
                        break;
                    }
                    mem.write(d.buf, &buf)?;
                }
                BLOCK_WRITE => {
                    mem.read(d.buf, &mut buf)?;
                    if self.file.write_all_at(&buf, off).is_err() {
                        status = BLOCK_IO_ERROR;
                        break;
                    }
                }
                op => return Err(format!("block descriptor {i}: unknown operation {op}")),
            }
        }
        mem.write_obj(addr, &BlockRequest { status, ..req })
    }
}
