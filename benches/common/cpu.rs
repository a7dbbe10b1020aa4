//! CPU time for the benches that report it (included with `#[path]`, so
//! each bench binary has its own copy).

/// CPU seconds (user + system) used so far by `who`: `libc::RUSAGE_SELF`
/// (the whole process) or `libc::RUSAGE_THREAD` (the calling thread).
pub fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(who, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
