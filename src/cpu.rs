//! CPU time of this process or thread, for the reports that show it
//! (`corekv bench`'s own CPU, and the benches under `benches/`).

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
