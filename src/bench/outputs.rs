//! The files a run writes besides its report: `--plot` and `--hdr`.
//!
//! They are created before the run, so a path that cannot be written fails
//! in a second instead of after the whole run, and written after the report
//! is printed, so a failure to write them never costs the report.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context as _;

use super::hgrm::{path_for_op, percentile_distribution};
use super::plot::{render, PlotInput};
use super::report::Measured;
use super::settings::Settings;
use super::workload::OpKind;

/// One file to write, open since the start of the run.
struct OutputFile {
    path: PathBuf,
    file: File,
}

impl OutputFile {
    fn create(path: &Path, flag: &str) -> anyhow::Result<OutputFile> {
        let file = File::create(path)
            .with_context(|| format!("cannot create the {flag} file {}", path.display()))?;
        Ok(OutputFile {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write(mut self, contents: &str) -> anyhow::Result<()> {
        self.file
            .write_all(contents.as_bytes())
            .and_then(|()| self.file.sync_all())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        eprintln!("wrote {}", self.path.display());
        Ok(())
    }
}

/// Which latencies an --hdr file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HdrContents {
    /// Every operation type of the run.
    All,
    /// One type.
    Op(OpKind),
}

/// The files asked for, open and empty.
pub(super) struct OutputFiles {
    plot: Option<OutputFile>,
    /// The --hdr file, then one per operation type if the mix has several.
    hdr: Vec<(HdrContents, OutputFile)>,
}

impl OutputFiles {
    pub(super) fn create(settings: &Settings) -> anyhow::Result<OutputFiles> {
        let args = &settings.args;
        let plot = match &args.plot {
            Some(path) => Some(OutputFile::create(path, "--plot")?),
            None => None,
        };
        let mut hdr = Vec::new();
        if let Some(path) = &args.hdr {
            hdr.push((HdrContents::All, OutputFile::create(path, "--hdr")?));
            if args.mix.kinds().count() > 1 {
                for kind in args.mix.kinds() {
                    let path = path_for_op(path, kind.name());
                    hdr.push((HdrContents::Op(kind), OutputFile::create(&path, "--hdr")?));
                }
            }
        }
        Ok(OutputFiles { plot, hdr })
    }

    /// Writes every file from the run's results; `started` is when the run
    /// began (after any prefill).
    pub(super) fn write(
        self,
        settings: &Settings,
        measured: &Measured,
        started: SystemTime,
    ) -> anyhow::Result<()> {
        let stats = &measured.stats;
        let total = stats.total();
        if let Some(file) = self.plot {
            // Threads that all stopped before measuring leave no timeline;
            // the plot then shows an empty window.
            let empty = settings.timeline();
            let timeline = stats
                .timeline
                .as_ref()
                .or(empty.as_ref())
                .expect("settings give a timeline when --plot is set");
            let kinds: Vec<OpKind> = settings.args.mix.kinds().collect();
            let mut latencies: Vec<(&str, _)> = kinds
                .iter()
                .map(|k| (k.name(), &stats.ops[k.index()].latency_us))
                .collect();
            if kinds.len() > 1 {
                latencies.push(("total", &total.latency_us));
            }
            let (title, details) = plot_titles(settings);
            let input = PlotInput {
                title,
                details,
                started,
                elapsed: measured.elapsed,
                timeline,
                latencies,
            };
            let svg = render(&input)
                .with_context(|| format!("cannot draw the plot for {}", file.path.display()))?;
            file.write(&svg)?;
        }
        for (contents, file) in self.hdr {
            let histogram = match contents {
                HdrContents::All => &total.latency_us,
                HdrContents::Op(kind) => &stats.ops[kind.index()].latency_us,
            };
            file.write(&percentile_distribution(histogram))?;
        }
        Ok(())
    }
}

/// The plot's two title lines: the workload's shape, then the rest of its
/// settings.
fn plot_titles(settings: &Settings) -> (String, String) {
    let args = &settings.args;
    let title = format!(
        "{} clients x {} in flight, mix {}, {} B values",
        args.clients, args.pipeline, args.mix, args.value_size
    );
    let gets = if args.mix.weight(OpKind::Get) > 0 {
        format!(", {} gets", args.consistency.name())
    } else {
        String::new()
    };
    let details = format!(
        "{} B keys, {} keys{gets}, {} threads, seed {}",
        args.key_size, args.keyspace, settings.threads, settings.seed
    );
    (title, details)
}
