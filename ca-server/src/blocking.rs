//! Blocking waits made from the CA's async workers (a store call, a token session).

use tokio::runtime::Handle;

/// Runs `wait` (a blocking wait) without holding an async worker: on a worker of a
/// multi-threaded tokio runtime, through `block_in_place`, which hands the worker's other tasks
/// (and its share of the timers and I/O) to another thread meanwhile. Elsewhere (a plain thread,
/// a blocking-pool thread, a current-thread runtime, which has no other worker to hand them to)
/// it just waits.
pub fn off_the_runtime<R>(wait: impl FnOnce() -> R) -> R {
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}
