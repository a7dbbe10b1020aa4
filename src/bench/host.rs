//! What the load generator's own machine did during the measured window:
//! the bench process's CPU time, and the machine's CPU pressure (Linux PSI,
//! `/proc/pressure/cpu`).
//!
//! A closed-loop run measures the cluster only while the machine that runs
//! it has CPU to spare. When the bench shares its machine with the nodes (a
//! `corekv dev` cluster), a runnable thread that waits for a CPU (a node's
//! shard, the io_uring worker doing its fdatasync, a client) adds that wait
//! to every latency in its path. The pressure says how much of the window
//! some thread spent waiting so; the report shows it beside the numbers it
//! colours.

use std::time::{Duration, Instant};

/// Where the kernel reports CPU pressure (Linux 4.20+, `CONFIG_PSI`).
const CPU_PRESSURE: &str = "/proc/pressure/cpu";

/// The host's state at one moment.
#[derive(Clone, Copy, Debug)]
pub(super) struct HostReading {
    at: Instant,
    /// User + system CPU time of this process so far.
    cpu: Duration,
    /// The "some" total of `/proc/pressure/cpu`: time, in µs, in which at
    /// least one runnable thread on this machine waited for a CPU. None
    /// where the kernel has no PSI (or it is switched off).
    pressure_some_us: Option<u64>,
}

impl HostReading {
    pub(super) fn now() -> HostReading {
        HostReading {
            at: Instant::now(),
            cpu: process_cpu(),
            pressure_some_us: std::fs::read_to_string(CPU_PRESSURE)
                .ok()
                .and_then(|text| some_total_us(&text)),
        }
    }
}

/// The load generator's share of the window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct HostReport {
    /// CPU seconds this process used in the window.
    pub(super) cpu_s: f64,
    /// The same per measured operation.
    pub(super) cpu_us_per_op: Option<f64>,
    /// Share (0 to 1) of the window in which some thread of this machine
    /// waited for a CPU.
    pub(super) cpu_pressure: Option<f64>,
}

impl HostReport {
    pub(super) fn new(before: &HostReading, after: &HostReading, ops: u64) -> HostReport {
        let cpu_s = after.cpu.saturating_sub(before.cpu).as_secs_f64();
        let wall_us = after.at.saturating_duration_since(before.at).as_micros() as f64;
        let cpu_pressure = match (before.pressure_some_us, after.pressure_some_us) {
            (Some(b), Some(a)) if wall_us > 0.0 => {
                Some((a.saturating_sub(b) as f64 / wall_us).min(1.0))
            }
            _ => None,
        };
        HostReport {
            cpu_s,
            cpu_us_per_op: (ops > 0).then(|| cpu_s * 1e6 / ops as f64),
            cpu_pressure,
        }
    }
}

/// User + system CPU time of this process (all its threads).
fn process_cpu() -> Duration {
    Duration::from_secs_f64(crate::cpu::cpu_seconds(libc::RUSAGE_SELF))
}

/// The `total=` of the `some` line of a PSI file:
/// `some avg10=0.00 avg60=0.00 avg300=0.00 total=12345`.
fn some_total_us(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_some_total_is_read_and_anything_else_is_none() {
        let psi = "some avg10=1.50 avg60=0.20 avg300=7.24 total=10451516500\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(some_total_us(psi), Some(10_451_516_500));
        assert_eq!(
            some_total_us("full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n"),
            None
        );
        assert_eq!(some_total_us("some avg10=0.00 total=x\n"), None);
        assert_eq!(some_total_us(""), None);
    }

    #[test]
    fn the_report_is_the_growth_over_the_window() {
        let at = Instant::now();
        let before = HostReading {
            at,
            cpu: Duration::from_secs(2),
            pressure_some_us: Some(1_000_000),
        };
        let after = HostReading {
            at: at + Duration::from_secs(10),
            cpu: Duration::from_secs(5),
            pressure_some_us: Some(5_000_000),
        };
        let report = HostReport::new(&before, &after, 1_000_000);
        assert!((report.cpu_s - 3.0).abs() < 1e-9);
        assert!((report.cpu_us_per_op.unwrap() - 3.0).abs() < 1e-9);
        assert!((report.cpu_pressure.unwrap() - 0.4).abs() < 1e-9);
        // No PSI on either side: no pressure, the CPU still counts.
        let without = HostReading {
            pressure_some_us: None,
            ..after
        };
        let report = HostReport::new(&before, &without, 0);
        assert_eq!(report.cpu_pressure, None);
        assert_eq!(report.cpu_us_per_op, None);
    }

    #[test]
    fn a_reading_of_this_machine_sees_its_cpu_and_pressure() {
        let before = HostReading::now();
        assert_eq!(
            before.pressure_some_us.is_some(),
            std::path::Path::new(CPU_PRESSURE).exists(),
            "a PSI file this parser cannot read"
        );
        // Work until the process's CPU time grows (its clock may tick in
        // steps of a few milliseconds).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut x = 0u64;
        while process_cpu() <= before.cpu {
            assert!(
                Instant::now() < deadline,
                "the process's CPU time never grew"
            );
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        let report = HostReport::new(&before, &HostReading::now(), 1);
        assert!(report.cpu_s > 0.0);
    }
}
