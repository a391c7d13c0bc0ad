//! The calling thread's CPU time, read without a system call while the
//! thread has not been switched out since the last one.
//!
//! Metering reads the thread's CPU clock at both ends of every poll of a
//! guest call, and `clock_gettime(CLOCK_THREAD_CPUTIME_ID)` is a system
//! call (the vDSO serves only the system-wide clocks): 0.4–1.4 µs here
//! depending on the hour, against ≈40 ns for the monotonic clock. Between
//! two context switches a thread runs without a break, so its CPU clock
//! advances with the monotonic clock. Each thread keeps an anchor: its CPU
//! clock and the monotonic clock read together, and how many times it had
//! been switched out then. The kernel keeps that count in a page it maps
//! for a perf software event counting the thread's context switches, and
//! updates the page each time the thread is switched back in. While the
//! count is unchanged, the CPU time now is the anchor's plus the monotonic
//! time since; after a switch (the thread slept in `epoll_wait`, or was
//! preempted) the next read makes a new anchor with the system call.
//!
//! What it gives up: between two switches, time the kernel spends on
//! interrupts while the thread runs (and a hypervisor's steal time) counts
//! as the thread's, which the kernel's own clock leaves out; and the two
//! clocks' rates differ a little (≈0.2% on this machine), so an anchor is
//! renewed after [`ANCHOR_FOR`]. Where the event cannot be opened
//! (context switches are counted in the kernel, which
//! `perf_event_paranoid` 2 or more allows only with `CAP_PERFMON`; a
//! seccomp filter; no file descriptor left) every read is the system
//! call, as before, and the host says so once in its log.
//!
//! Hand-written on top of `perf-event-open-sys`'s bindings: the crates
//! that wrap perf events read counters with `read(2)` (a system call, the
//! cost this avoids) or with `rdpmc`, which software events do not have.

use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{Ordering, compiler_fence};
use std::time::{Duration, Instant};

use perf_event_open_sys::bindings;

/// How long an anchor serves before the next read renews it.
const ANCHOR_FOR: Duration = Duration::from_millis(10);

/// The calling thread's CPU time so far.
pub(crate) fn thread_cpu_time() -> Duration {
    // A thread's last reads may come as its thread-locals are destroyed.
    THREAD.try_with(ThreadClock::now).unwrap_or_else(|_| kernel_thread_cpu_time())
}

thread_local! {
    static THREAD: ThreadClock = ThreadClock::open();
}

/// One thread's CPU clock.
struct ThreadClock {
    /// Its context switches, when the perf event could be opened.
    switches: Option<SwitchCount>,
    anchor: Cell<Option<Anchor>>,
    /// The last time returned: reads never go back (an anchor's estimate
    /// may run ahead of the kernel's clock by the interrupts it counted).
    last: Cell<Duration>,
}

/// CPU and monotonic clock read together, between the same two switches.
#[derive(Clone, Copy)]
struct Anchor {
    switches: u64,
    cpu: Duration,
    at: Instant,
}

impl ThreadClock {
    fn open() -> ThreadClock {
        let switches = match SwitchCount::open() {
            Ok(switches) => Some(switches),
            Err(err) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::warn!(
                        error = %err,
                        "cannot count threads' context switches (perf_event_open): each read of a thread's CPU clock is a system call"
                    );
                });
                None
            }
        };
        ThreadClock { switches, anchor: Cell::new(None), last: Cell::new(Duration::ZERO) }
    }

    fn now(&self) -> Duration {
        let now = self.read().max(self.last.get());
        self.last.set(now);
        now
    }

    fn read(&self) -> Duration {
        let Some(counter) = &self.switches else { return kernel_thread_cpu_time() };
        let switches = counter.read();
        if let Some(anchor) = self.anchor.get().filter(|anchor| anchor.switches == switches) {
            let since = anchor.at.elapsed();
            if since < ANCHOR_FOR {
                return anchor.cpu + since;
            }
        }
        let cpu = kernel_thread_cpu_time();
        let at = Instant::now();
        // A switch between the two clock reads would part them: anchor
        // only when none happened.
        let anchor = (counter.read() == switches).then_some(Anchor { switches, cpu, at });
        self.anchor.set(anchor);
        cpu
    }
}

/// The kernel's CPU clock of the calling thread (a system call).
fn kernel_thread_cpu_time() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map(Duration::from).unwrap_or_default()
}

/// A perf software event counting the calling thread's context switches,
/// its page mapped.
struct SwitchCount {
    page: NonNull<bindings::perf_event_mmap_page>,
    length: usize,
    _event: OwnedFd,
}

impl SwitchCount {
    fn open() -> std::io::Result<SwitchCount> {
        let mut attr = bindings::perf_event_attr {
            type_: bindings::PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<bindings::perf_event_attr>() as u32,
            config: u64::from(bindings::PERF_COUNT_SW_CONTEXT_SWITCHES),
            ..Default::default()
        };
        // SAFETY: `attr` is initialised (zero but for the fields above) and
        // asks only to count this thread's switches (pid 0, any CPU).
        let fd = unsafe {
            perf_event_open_sys::perf_event_open(
                &mut attr,
                0,
                -1,
                -1,
                libc::c_ulong::from(bindings::PERF_FLAG_FD_CLOEXEC),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a new descriptor, owned here.
        let event = unsafe { OwnedFd::from_raw_fd(fd) };
        let length =
            nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |size| size as usize);
        // SAFETY: maps the event's metadata page read-only; it lives until
        // `Drop` unmaps it.
        let page = unsafe {
            libc::mmap(std::ptr::null_mut(), length, libc::PROT_READ, libc::MAP_SHARED, event.as_raw_fd(), 0)
        };
        if page == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let page = NonNull::new(page.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(SwitchCount { page, length, _event: event })
    }

    /// The thread's context switches, as of its last switch back in.
    fn read(&self) -> u64 {
        let page = self.page.as_ptr();
        loop {
            // SAFETY: the page is mapped while `self` lives; the kernel
            // writes it under the `lock` sequence count, read around the
            // value as its documentation says (a software event has no
            // hardware counter: `index` is 0 and the count is `offset`).
            let (before, count, after) = unsafe {
                let before = std::ptr::read_volatile(&raw const (*page).lock);
                compiler_fence(Ordering::Acquire);
                let count = std::ptr::read_volatile(&raw const (*page).offset);
                compiler_fence(Ordering::Acquire);
                (before, count, std::ptr::read_volatile(&raw const (*page).lock))
            };
            if before == after {
                return count as u64;
            }
        }
    }
}

impl Drop for SwitchCount {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.page.as_ptr().cast(), self.length) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_context_switch_count_opens_and_counts_a_sleep() {
        let counter = SwitchCount::open().expect("perf_event_open of this thread's context switches");
        let before = counter.read();
        std::thread::sleep(Duration::from_millis(2));
        assert!(counter.read() > before, "a sleep is a switch out and back in");
    }

    #[test]
    fn a_thread_asleep_uses_no_cpu_time_and_one_computing_uses_what_the_kernel_counts() {
        let clock = ThreadClock::open();
        assert!(clock.switches.is_some(), "the context switch count opens here");
        let start = clock.now();
        std::thread::sleep(Duration::from_millis(50));
        let slept = clock.now() - start;
        assert!(slept < Duration::from_millis(5), "50 ms asleep counted as {slept:?} of CPU");

        let (start, kernel_start) = (clock.now(), kernel_thread_cpu_time());
        let mut reads = 0u64;
        while kernel_thread_cpu_time() - kernel_start < Duration::from_millis(30) {
            let now = clock.now();
            assert!(now >= start, "the clock never goes back");
            reads += 1;
        }
        let (used, kernel) = (clock.now() - start, kernel_thread_cpu_time() - kernel_start);
        let diff = used.abs_diff(kernel);
        assert!(reads > 100, "{reads} reads");
        assert!(diff < kernel / 20 + Duration::from_millis(1), "computing: {used:?} against the kernel's {kernel:?}");
    }
}
