//! Test support: a global allocator that, while armed, looks into every block freed for a few
//! known byte strings (a secret, its base64 form) before handing the block back to the system.
//!
//! A test binary installs it with
//!
//! ```text
//! #[global_allocator]
//! static ALLOCATOR: wipe_check::ScanningAllocator = wipe_check::ScanningAllocator;
//! ```
//!
//! (safe code: only the impl below is unsafe), [`arm`]s it with the secret once the secret is
//! known to the process, makes the process handle it (a real client fetches it from a real
//! server), and [`disarm`]s it: the [`Report`] counts the freed blocks that still held one of the
//! strings. A copy that is wiped before it is freed (`zeroize::Zeroizing`) is not counted; a copy
//! freed as it was written is; so is a buffer left behind by a reallocation (`realloc` here is
//! `GlobalAlloc`'s own: allocate, copy, free the old block through [`ScanningAllocator::dealloc`]).
//!
//! What it cannot see: copies still allocated when it is disarmed, copies on a stack or in
//! registers, and memory not obtained from the Rust global allocator (the kernel's socket
//! buffers, a C library's own `malloc`).
//!
//! Why a crate of its own: the workspace forbids unsafe code (`forbid` cannot be relaxed by an
//! `allow` in the same crate, and a test file of `ca-server` is built with `ca-server`'s lints),
//! and a `GlobalAlloc` has to read a raw pointer. This crate only denies unsafe code and allows
//! it on the one impl below; the test that uses it stays in safe code.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};

/// How many strings can be looked for at once.
pub const MAX_PATTERNS: usize = 4;
/// The longest string that can be looked for.
pub const MAX_PATTERN_LEN: usize = 64;
/// The shortest: shorter strings would be found by chance.
pub const MIN_PATTERN_LEN: usize = 12;
/// How many hits are described one by one in a [`Report`].
const MAX_HITS_KEPT: usize = 16;

static ARMED: AtomicBool = AtomicBool::new(false);
static PATTERNS: [[AtomicU8; MAX_PATTERN_LEN]; MAX_PATTERNS] =
    [const { [const { AtomicU8::new(0) }; MAX_PATTERN_LEN] }; MAX_PATTERNS];
static LENS: [AtomicUsize; MAX_PATTERNS] = [const { AtomicUsize::new(0) }; MAX_PATTERNS];
static SCANNED: AtomicUsize = AtomicUsize::new(0);
static SCANNED_BYTES: AtomicUsize = AtomicUsize::new(0);
static HITS: AtomicUsize = AtomicUsize::new(0);
static HIT_SIZES: [AtomicUsize; MAX_HITS_KEPT] = [const { AtomicUsize::new(0) }; MAX_HITS_KEPT];
static HIT_PATTERNS: [AtomicUsize; MAX_HITS_KEPT] = [const { AtomicUsize::new(0) }; MAX_HITS_KEPT];

/// The system allocator, with every freed block looked into while armed. Every block it hands
/// out is zeroed first, so that a freed block is initialized memory in every byte.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanningAllocator;

/// What was found between [`arm`] and [`disarm`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// Blocks freed (and looked into) while armed.
    pub scanned: usize,
    /// Their bytes, together.
    pub scanned_bytes: usize,
    /// Freed blocks that still held one of the strings.
    pub hits: usize,
    /// The first hits: (block size, index of the string found in it).
    pub hit_blocks: Vec<(usize, usize)>,
}

/// Starts looking for `patterns` (1 to [`MAX_PATTERNS`] strings of [`MIN_PATTERN_LEN`] to
/// [`MAX_PATTERN_LEN`] bytes) in every block freed from now on, with the counts at zero.
pub fn arm(patterns: &[&[u8]]) -> Result<(), String> {
    if patterns.is_empty() || patterns.len() > MAX_PATTERNS {
        return Err(format!(
            "1 to {MAX_PATTERNS} patterns, not {}",
            patterns.len()
        ));
    }
    if let Some(p) = patterns
        .iter()
        .find(|p| !(MIN_PATTERN_LEN..=MAX_PATTERN_LEN).contains(&p.len()))
    {
        return Err(format!(
            "a pattern is {MIN_PATTERN_LEN} to {MAX_PATTERN_LEN} bytes, not {}",
            p.len()
        ));
    }
    ARMED.store(false, Ordering::SeqCst);
    for (i, slot) in PATTERNS.iter().enumerate() {
        let p = patterns.get(i).copied().unwrap_or_default();
        for (j, b) in slot.iter().enumerate() {
            b.store(p.get(j).copied().unwrap_or(0), Ordering::Relaxed);
        }
        LENS[i].store(p.len(), Ordering::Relaxed);
    }
    for c in [&SCANNED, &SCANNED_BYTES, &HITS] {
        c.store(0, Ordering::Relaxed);
    }
    BACKTRACES.store(
        std::env::var_os("WIPE_CHECK_BACKTRACE").is_some_and(|v| v == "1"),
        Ordering::Relaxed,
    );
    ARMED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Stops looking, and says what was found since [`arm`]. The patterns are wiped.
pub fn disarm() -> Report {
    ARMED.store(false, Ordering::SeqCst);
    for (slot, len) in PATTERNS.iter().zip(&LENS) {
        for b in slot {
            b.store(0, Ordering::Relaxed);
        }
        len.store(0, Ordering::Relaxed);
    }
    let hits = HITS.load(Ordering::SeqCst);
    Report {
        scanned: SCANNED.load(Ordering::SeqCst),
        scanned_bytes: SCANNED_BYTES.load(Ordering::SeqCst),
        hits,
        hit_blocks: (0..hits.min(MAX_HITS_KEPT))
            .map(|i| {
                (
                    HIT_SIZES[i].load(Ordering::SeqCst),
                    HIT_PATTERNS[i].load(Ordering::SeqCst),
                )
            })
            .collect(),
    }
}

/// Whether each hit prints the stack that freed the block (`WIPE_CHECK_BACKTRACE=1`, read at
/// [`arm`]): to find which copy it was.
static BACKTRACES: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Set while this thread prints a backtrace: the blocks it frees meanwhile are not scanned.
    static PRINTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Looks for the armed patterns in a block about to be freed. Allocates nothing (unless
/// backtraces were asked for, and then only on a hit), and compares against the patterns where
/// they are kept, byte by byte: a copy of them on this thread's stack would be picked up by the
/// next value moved from the stack into the heap (padding and unused space are copied too), and
/// be found there.
fn scan(block: &[u8]) {
    if PRINTING.with(std::cell::Cell::get) {
        return;
    }
    SCANNED.fetch_add(1, Ordering::Relaxed);
    SCANNED_BYTES.fetch_add(block.len(), Ordering::Relaxed);
    for (i, (pattern, len)) in PATTERNS.iter().zip(&LENS).enumerate() {
        let len = len.load(Ordering::Relaxed);
        if len == 0 || len > block.len() {
            continue;
        }
        let pattern = &pattern[..len];
        let found = block.windows(len).position(|w| {
            w.iter()
                .zip(pattern)
                .all(|(b, p)| *b == p.load(Ordering::Relaxed))
        });
        if let Some(at) = found {
            let n = HITS.fetch_add(1, Ordering::SeqCst);
            if n < MAX_HITS_KEPT {
                HIT_SIZES[n].store(block.len(), Ordering::SeqCst);
                HIT_PATTERNS[n].store(i, Ordering::SeqCst);
            }
            if BACKTRACES.load(Ordering::Relaxed) {
                PRINTING.with(|p| p.set(true));
                eprintln!(
                    "wipe-check: freed block of {} bytes holds pattern {i} at offset {at}:\n{}",
                    block.len(),
                    std::backtrace::Backtrace::force_capture()
                );
                PRINTING.with(|p| p.set(false));
            }
            return;
        }
    }
}

#[allow(unsafe_code)]
// SAFETY: every method forwards to `System` with the caller's own arguments, so the
// `GlobalAlloc` contract the caller keeps for this allocator is the one `System` needs. `realloc`
// is not overridden: the trait's default allocates through `alloc`, copies, and frees the old
// block through `dealloc`, so that the old block is looked into too.
unsafe impl GlobalAlloc for ScanningAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout has a non-zero size (the `alloc` contract). Zeroed, so that
        // every byte of a block is initialized when `dealloc` reads it.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::Acquire) {
            // SAFETY: the caller guarantees that `ptr` came from this allocator with `layout`
            // and is not yet freed, so `layout.size()` bytes at `ptr` are ours to read until the
            // `System.dealloc` below; every one of them is initialized, because `alloc` and
            // `alloc_zeroed` hand out zeroed blocks and the default `realloc` makes its new block
            // through `alloc`. Nothing else writes the block any more (it is being freed).
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            scan(block);
        }
        // SAFETY: forwarded unchanged; `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[global_allocator]
    static ALLOCATOR: ScanningAllocator = ScanningAllocator;

    /// One test, since the allocator's state is global.
    #[test]
    fn a_freed_copy_is_counted_and_a_wiped_one_is_not() {
        let secret: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
        arm(&[&secret]).unwrap();
        let copy = secret.clone();
        drop(std::hint::black_box(copy));
        let report = disarm();
        assert_eq!(report.hits, 1, "{report:?}");
        assert_eq!(report.hit_blocks, vec![(32, 0)]);

        arm(&[&secret]).unwrap();
        let mut wiped = secret.clone();
        wiped.iter_mut().for_each(|b| *b = 0);
        drop(std::hint::black_box(wiped));
        let report = disarm();
        assert_eq!(report.hits, 0, "{report:?}");
        assert!(report.scanned >= 1);

        // A vector that grows leaves its old block behind.
        arm(&[&secret]).unwrap();
        let mut grown = Vec::with_capacity(32);
        grown.extend_from_slice(&secret);
        grown.extend_from_slice(&[0u8; 100]);
        grown.iter_mut().for_each(|b| *b = 0);
        drop(std::hint::black_box(grown));
        let report = disarm();
        assert_eq!(
            report.hits, 1,
            "the block left by the reallocation: {report:?}"
        );

        assert!(arm(&[b"short"]).is_err());
    }
}
