//! The simulator's runs: many seeds per `cargo test`, any one seed on
//! demand, and (with `--features sim-bugs`) proof that each planted mistake
//! is found.
//!
//! - `cargo test -p corekv-node sim::tests` runs `COREKV_SIM_SEEDS` seeds
//!   (default 40) from `COREKV_SIM_FIRST_SEED` (default: a fixed one, so CI
//!   is reproducible; set it to explore new schedules), and
//!   `COREKV_SIM_LONG_SEEDS` long ones (default 2, of five simulated
//!   minutes), on every core.
//! - `COREKV_SIM_SEED=N cargo test -p corekv-node sim::tests::replay -- --nocapture`
//!   re-runs seed N and prints its fault schedule.

use super::cluster::{Config, Failure, Sim};

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {text:?}")),
    )
}

/// One seed; a panic inside the replica (raft-rs asserts) is a failure of
/// that seed too, reported with the seed.
fn run(seed: u64) -> Result<usize, Failure> {
    run_steps(seed, env_u64("COREKV_SIM_STEPS"))
}

fn run_steps(seed: u64, steps: Option<u64>) -> Result<usize, Failure> {
    let mut config = Config::new(seed);
    if let Some(steps) = steps {
        config.steps = steps;
    }
    let outcome = std::panic::catch_unwind(|| Sim::new(config).run_and_check());
    outcome.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".to_string());
        Err(Failure {
            seed,
            what: format!("panicked: {what}"),
            schedule: Vec::new(),
        })
    })
}

/// Runs `count` seeds from `first` with `steps` faulty steps each, on every
/// core; the failure of the lowest failing seed, or the answered count.
fn run_seeds(first: u64, count: u64, steps: Option<u64>) -> Result<usize, Failure> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let results: Vec<Result<usize, Failure>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                scope.spawn(move || {
                    let mut answered = 0;
                    for seed in (first + worker..first + count).step_by(workers as usize) {
                        answered += run_steps(seed, steps)?;
                    }
                    Ok(answered)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker panicked outside a seed"))
            .collect()
    });
    let mut answered = 0;
    let mut first_failure: Option<Failure> = None;
    for result in results {
        match result {
            Ok(count) => answered += count,
            Err(failure) => {
                if first_failure.as_ref().is_none_or(|f| failure.seed < f.seed) {
                    first_failure = Some(failure);
                }
            }
        }
    }
    first_failure.map_or(Ok(answered), Err)
}

/// `COREKV_SIM_SEEDS` runs (default 40) of 7.5 simulated seconds from
/// `COREKV_SIM_FIRST_SEED` (default 1000).
#[test]
fn seeds_are_linearizable_and_keep_every_invariant() {
    let first = env_u64("COREKV_SIM_FIRST_SEED").unwrap_or(1_000);
    let seeds = env_u64("COREKV_SIM_SEEDS").unwrap_or(40);
    let started = std::time::Instant::now();
    let answered = run_seeds(first, seeds, env_u64("COREKV_SIM_STEPS"))
        .unwrap_or_else(|failure| panic!("{failure}"));
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{seeds} seeds from {first}: {answered} operations answered and checked in {seconds:.1} s \
         ({:.0} seeds/s)",
        seeds as f64 / seconds
    );
    assert!(
        answered as u64 > seeds * 100,
        "the clients got too few answers: {answered}"
    );
}

/// `COREKV_SIM_LONG_SEEDS` runs (default 2) of `COREKV_SIM_LONG_STEPS`
/// faulty steps (default 300,000: five simulated minutes; a tenth of that in
/// a debug build, which runs ten times slower), from seed 1. The clients
/// move to new keys every 20 simulated seconds, so no key's history grows
/// past what the checker searches in its budget.
#[test]
fn long_runs_are_linearizable_and_keep_every_invariant() {
    let seeds = env_u64("COREKV_SIM_LONG_SEEDS").unwrap_or(2);
    let default_steps = if cfg!(debug_assertions) {
        30_000
    } else {
        300_000
    };
    let steps = env_u64("COREKV_SIM_LONG_STEPS").unwrap_or(default_steps);
    let answered = run_seeds(1, seeds, Some(steps)).unwrap_or_else(|failure| panic!("{failure}"));
    eprintln!("{seeds} long seeds of {steps} steps: {answered} operations answered and checked");
}

/// Seeds that once found a bug, run every time.
const REGRESSION_SEEDS: &[u64] = &[
    // raft-rs aborted in a campaign between advancing and persisting an
    // installed snapshot (see `Replica::installing_snapshot`).
    21394,
    // A leader that started a transfer served a lease read after the new
    // leader took a write (see `Replica::suspect_lease`).
    6707,
    // A leader took over while its own removal, proposed by the leader
    // before it, was uncommitted; it applied it and went on leading without
    // its own progress, and raft-rs aborted (see
    // `Replica::step_down_if_removed`).
    1711,
];

#[test]
fn seeds_that_once_failed_pass() {
    for &seed in REGRESSION_SEEDS {
        if let Err(failure) = run(seed) {
            panic!("{failure}");
        }
    }
}

#[test]
fn replay() {
    let Some(seed) = env_u64("COREKV_SIM_SEED") else {
        return;
    };
    match run(seed) {
        Ok(answered) => eprintln!("seed {seed}: passed, {answered} operations answered"),
        Err(failure) => panic!("{failure}"),
    }
}

#[test]
fn a_seed_replays_exactly() {
    let run = |seed| {
        let (history, schedule) = Sim::new(Config::new(seed)).run().expect("passes");
        (format!("{:?}", history.records()), schedule)
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7).0, run(8).0);
}

/// Each planted mistake is found within this many seeds.
#[cfg(feature = "sim-bugs")]
const SEEDS_TO_FIND_A_BUG: u64 = 300;

#[cfg(feature = "sim-bugs")]
#[test]
fn every_planted_bug_is_found() {
    use crate::sim_bugs::{plant, Bug};
    let mut missed = Vec::new();
    for bug in Bug::ALL {
        plant(Some(bug));
        let found = (0..SEEDS_TO_FIND_A_BUG).find_map(|seed| run(seed).err());
        plant(None);
        match found {
            Some(failure) => eprintln!(
                "{bug:?} found by seed {}: {}",
                failure.seed,
                failure.what.lines().next().unwrap_or_default()
            ),
            None => missed.push(bug),
        }
    }
    assert!(
        missed.is_empty(),
        "not found in {SEEDS_TO_FIND_A_BUG} seeds: {missed:?}"
    );
}
