//! What a slow loop turn was doing and what the kernel did to the thread
//! meanwhile, so one warning line tells a stall of our own code (CPU time
//! close to the wall time) from page faults or from the thread not running
//! at all (preempted, or the vCPU stolen by the host).

use std::time::{Duration, Instant};

use super::inputs::Input;

/// The kinds of input a turn took, counted, so a slow turn names what it
/// handled. Indexed by [`kind`].
#[derive(Default)]
pub(super) struct InputKinds([u32; KINDS.len()]);

const KINDS: [&str; 11] = [
    "tick",
    "raft",
    "client",
    "conn_closed",
    "forward",
    "forward_reply",
    "cross_core",
    "synced",
    "link",
    "snapshot_sent",
    "snapshot_received",
];

fn kind(input: &Input) -> usize {
    match input {
        Input::Tick => 0,
        Input::Raft(_) => 1,
        Input::Client { .. } => 2,
        Input::ConnClosed(_) => 3,
        Input::Forward { .. } => 4,
        Input::ForwardReply(_) => 5,
        Input::CrossCore(_) => 6,
        Input::Synced { .. } => 7,
        Input::Link { .. } => 8,
        Input::SnapshotSent { .. } => 9,
        Input::SnapshotReceived(_) => 10,
    }
}

impl InputKinds {
    pub(super) fn count(&mut self, input: &Input) {
        self.0[kind(input)] += 1;
    }

    pub(super) fn clear(&mut self) {
        self.0 = [0; KINDS.len()];
    }

    /// `raft=1 client=3`: the kinds seen, for a log line.
    pub(super) fn describe(&self) -> String {
        let mut text = String::new();
        for (name, n) in KINDS.iter().zip(self.0) {
            if n > 0 {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(&format!("{name}={n}"));
            }
        }
        text
    }
}

/// The thread's resource usage, sampled at most once per `every` so the
/// loop pays a system call per interval, not per turn. A slow turn compares
/// against the last sample, which it follows by at most `every` plus the
/// turn itself.
pub(super) struct UsageSampler {
    every: Duration,
    at: Instant,
    usage: Usage,
}

/// One `getrusage(RUSAGE_THREAD)` reading.
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu: Duration,
    minor_faults: i64,
    major_faults: i64,
    voluntary_switches: i64,
    involuntary_switches: i64,
}

/// What happened to the thread between a sample and the end of a slow turn.
pub(super) struct UsageDelta {
    /// Wall time covered.
    pub(super) wall: Duration,
    /// CPU time the thread used in it (user + system).
    pub(super) cpu: Duration,
    pub(super) minor_faults: i64,
    pub(super) major_faults: i64,
    /// Waits the thread chose (a blocking system call).
    pub(super) voluntary_switches: i64,
    /// Times the scheduler took the CPU away.
    pub(super) involuntary_switches: i64,
}

impl Usage {
    fn now() -> Usage {
        // SAFETY: getrusage only writes the struct it is given; all-zero is
        // a valid `rusage`.
        let mut raw: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a live rusage; RUSAGE_THREAD is
        // supported since Linux 2.6.26.
        if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut raw) } != 0 {
            return Usage::default();
        }
        let time = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec.max(0) as u64)
                + Duration::from_micros(t.tv_usec.max(0) as u64)
        };
        Usage {
            cpu: time(raw.ru_utime) + time(raw.ru_stime),
            minor_faults: raw.ru_minflt,
            major_faults: raw.ru_majflt,
            voluntary_switches: raw.ru_nvcsw,
            involuntary_switches: raw.ru_nivcsw,
        }
    }
}

impl UsageSampler {
    pub(super) fn new(every: Duration) -> UsageSampler {
        UsageSampler {
            every,
            at: Instant::now(),
            usage: Usage::now(),
        }
    }

    /// Call at the end of every turn: takes a new sample once `every` has
    /// passed since the last.
    pub(super) fn maybe_sample(&mut self, now: Instant) {
        if now.saturating_duration_since(self.at) >= self.every {
            self.at = now;
            self.usage = Usage::now();
        }
    }

    /// Usage since the last sample, then a fresh sample.
    pub(super) fn delta(&mut self) -> UsageDelta {
        let now = Instant::now();
        let usage = Usage::now();
        let delta = UsageDelta {
            wall: now.saturating_duration_since(self.at),
            cpu: usage.cpu.saturating_sub(self.usage.cpu),
            minor_faults: usage.minor_faults - self.usage.minor_faults,
            major_faults: usage.major_faults - self.usage.major_faults,
            voluntary_switches: usage.voluntary_switches - self.usage.voluntary_switches,
            involuntary_switches: usage.involuntary_switches - self.usage.involuntary_switches,
        };
        self.at = now;
        self.usage = usage;
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_thread_shows_its_cpu_and_its_faults() {
        let mut sampler = UsageSampler::new(Duration::from_secs(3600));
        // 16 MiB of fresh pages, each written once: a fault per page.
        let mut pages = vec![0u8; 16 << 20];
        for i in (0..pages.len()).step_by(4096) {
            pages[i] = 1;
        }
        let touched = sampler.delta();
        assert!(touched.minor_faults > 0, "no page faults counted");
        // Spin until the thread has used CPU the kernel accounted.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut spun = Duration::ZERO;
        let mut sum = 0u64;
        while spun == Duration::ZERO && Instant::now() < deadline {
            for i in 0..1_000_000u64 {
                sum = sum.wrapping_add(std::hint::black_box(i));
            }
            spun += sampler.delta().cpu;
        }
        assert!(spun > Duration::ZERO, "no CPU time counted ({sum})");
        assert_eq!(pages[4096], 1);
    }

    #[test]
    fn kinds_are_counted_and_described() {
        let mut kinds = InputKinds::default();
        kinds.count(&Input::Tick);
        kinds.count(&Input::Tick);
        kinds.count(&Input::ConnClosed(7));
        assert_eq!(kinds.describe(), "tick=2 conn_closed=1");
        kinds.clear();
        assert_eq!(kinds.describe(), "");
    }
}
