//! Work split across the threads a context was given, for the reductions that run inside
//! the eval callback (the graph is stopped meanwhile, so its cores are free). Tasks are
//! independent and write disjoint outputs, so results do not depend on the thread count.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Run `f` on every item of `items` (each taken by one thread), on at most `threads`
/// threads, the calling one included; items are handed out in order as threads free up.
/// Returns the results in item order.
pub fn map_tasks<T: Send, R: Send>(threads: usize, items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    let n = items.len();
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return items.into_iter().map(f).collect();
    }
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let out: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let work = || loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        if k >= n {
            break;
        }
        // Each slot is taken once (the counter hands out each index once); a poisoned lock
        // only means another task panicked, which the scope re-raises below.
        let item = slots[k].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(item) = item {
            let r = f(item);
            *out[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        }
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        work();
        for h in handles {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
    });
    out.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every task ran")).collect()
}

/// Element visits below which one thread does the work (starting one costs tens of
/// microseconds); unit tests use every thread at any size.
#[cfg(not(test))]
const MIN_PARALLEL_WORK: usize = 1 << 20;
#[cfg(test)]
const MIN_PARALLEL_WORK: usize = 1;

/// Threads worth using for `work` element visits: one for small work, else `threads`.
pub fn threads_for(threads: usize, work: usize) -> usize {
    if work < MIN_PARALLEL_WORK {
        1
    } else {
        threads.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_item_order_for_any_thread_count() {
        for t in [1, 2, 3, 8] {
            let r = map_tasks(t, (0..37).collect(), |x: u64| x * x);
            assert_eq!(r, (0..37).map(|x| x * x).collect::<Vec<u64>>(), "threads {t}");
        }
        assert!(map_tasks(4, Vec::<u8>::new(), |x| x).is_empty());
    }
}
