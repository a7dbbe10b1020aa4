//! The files a run writes besides its report: `--hdr`.
//!
//! They are created before the run, so a path that cannot be written fails
//! in a second instead of after the whole run, and written after the report
//! is printed, so a failure to write them never costs the report.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::hgrm::{path_for_op, percentile_distribution};
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
    /// The --hdr file, then one per operation type if the mix has several.
    hdr: Vec<(HdrContents, OutputFile)>,
}

impl OutputFiles {
    pub(super) fn create(settings: &Settings) -> anyhow::Result<OutputFiles> {
        let args = &settings.args;
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
        Ok(OutputFiles { hdr })
    }

    /// Writes every file from the run's results.
    pub(super) fn write(self, measured: &Measured) -> anyhow::Result<()> {
        let stats = &measured.stats;
        let total = stats.total();
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
