//! The global allocator: a first-fit free list over the heap region of the boot information
//! page, kept sorted by address so that freed neighbours merge back.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::null_mut;

/// A free block: its size (bytes, a multiple of [`UNIT`]) and the next free block.
struct Free {
    size: usize,
    next: *mut Free,
}

/// Every block is a multiple of this size and aligned to it, so a free block always has room
/// for its header.
const UNIT: usize = 16;

struct Heap {
    head: UnsafeCell<*mut Free>,
}

// SAFETY: a guest is single-threaded and has no interrupts: nothing accesses the heap
// concurrently.
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap { head: UnsafeCell::new(null_mut()) };

pub(crate) fn init() {
    let info = crate::boot_info();
    let start = (info.heap_start as usize).next_multiple_of(UNIT);
    let end = (info.heap_start + info.heap_size) as usize & !(UNIT - 1);
    if end <= start + UNIT {
        return;
    }
    let block = start as *mut Free;
    // SAFETY: the VMM gives the heap region to the guest alone; it is mapped, writable and
    // aligned to UNIT.
    unsafe {
        block.write(Free { size: end - start, next: null_mut() });
        *HEAP.head.get() = block;
    }
}

// SAFETY: `alloc` returns blocks inside the heap that no other live allocation overlaps,
// aligned as asked (or null); `dealloc` puts a block back exactly once (the caller's contract).
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size().max(1).next_multiple_of(UNIT);
        let align = layout.align().max(UNIT);
        // SAFETY: the free list only holds blocks inside the heap, each with a valid header,
        // and nothing else runs while we walk it.
        unsafe {
            let mut link: *mut *mut Free = self.head.get();
            while !(*link).is_null() {
                let block = *link;
                let start = block as usize;
                let end = start + (*block).size;
                let user = start.next_multiple_of(align);
                if user + size <= end {
                    let next = (*block).next;
                    // Carve [user, user+size) out; keep the front gap and the tail free.
                    let mut rest = next;
                    if end > user + size {
                        let tail = (user + size) as *mut Free;
                        tail.write(Free { size: end - user - size, next });
                        rest = tail;
                    }
                    if user > start {
                        (*block).size = user - start;
                        (*block).next = rest;
                    } else {
                        *link = rest;
                    }
                    return user as *mut u8;
                }
                link = &mut (*block).next;
            }
        }
        null_mut()
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let size = layout.size().max(1).next_multiple_of(UNIT);
        let start = ptr as usize;
        // SAFETY: `ptr` came from `alloc` with this layout, so [start, start+size) is a block
        // of the heap that is not on the free list; the list stays sorted and merged.
        unsafe {
            let mut prev: *mut Free = null_mut();
            let mut cur = *self.head.get();
            while !cur.is_null() && (cur as usize) < start {
                prev = cur;
                cur = (*cur).next;
            }
            let block = start as *mut Free;
            block.write(Free { size, next: cur });
            if !cur.is_null() && start + size == cur as usize {
                (*block).size += (*cur).size;
                (*block).next = (*cur).next;
            }
            if prev.is_null() {
                *self.head.get() = block;
            } else if prev as usize + (*prev).size == start {
                (*prev).size += (*block).size;
                (*prev).next = (*block).next;
            } else {
                (*prev).next = block;
            }
        }
    }
}
