//! The block device: batched sector reads and writes.

use vmm_abi::{BlockDesc, BlockRequest, BLOCK_FLUSH, BLOCK_OK, BLOCK_READ, BLOCK_WRITE, PORT_BLOCK, SECTOR_SIZE};

/// The host reported an I/O error for a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoError;

/// Disk size in sectors (0: no disk).
pub fn sectors() -> u64 {
    crate::boot_info().disk_sectors
}

/// Performs a batch of operations in one exit.
pub fn submit(descs: &[BlockDesc]) -> Result<(), IoError> {
    let mut req = BlockRequest { count: descs.len() as u32, status: 0, descs: descs.as_ptr() as u64 };
    crate::port::request(PORT_BLOCK, &mut req);
    if req.status == BLOCK_OK {
        Ok(())
    } else {
        Err(IoError)
    }
}

/// Reads `buf.len() / 512` sectors starting at `sector`.
pub fn read(sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
    let d = BlockDesc { op: BLOCK_READ, sectors: (buf.len() as u64 / SECTOR_SIZE) as u32, sector, buf: buf.as_mut_ptr() as u64 };
    submit(&[d])
}

/// Writes `buf.len() / 512` sectors starting at `sector`.
pub fn write(sector: u64, buf: &[u8]) -> Result<(), IoError> {
    let d = BlockDesc { op: BLOCK_WRITE, sectors: (buf.len() as u64 / SECTOR_SIZE) as u32, sector, buf: buf.as_ptr() as u64 };
    submit(&[d])
}

/// Makes every completed write durable on the host.
pub fn flush() -> Result<(), IoError> {
    submit(&[BlockDesc { op: BLOCK_FLUSH, ..Default::default() }])
}
