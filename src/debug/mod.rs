//! `corekv debug wal` and `corekv debug snapshot`: what a stopped node's
//! files hold, every checksum checked, without changing a byte.
//!
//! For an operator whose node refuses to start: the node names the bad file
//! and offset; these commands show what is around it. They read files
//! through read-only opens only, and use the decoders the node uses
//! (`corekv_wal::inspect`, `corekv_node::snapshot::visit`), never the
//! recovery path, which repairs while it reads.
//!
//! Exit codes: 0 the files read clean (a torn WAL tail, which recovery cuts,
//! counts as clean); 1 corruption found, after printing everything read up
//! to it; 2 a usage or I/O error (printed on stderr).

mod entry;
mod snapshot;
mod wal;

use std::io::{BufWriter, Stdout, Write};
use std::process::ExitCode;

use clap::Subcommand;

/// Read a stopped node's files.
#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Print every record of a stopped shard's WAL, checking every checksum
    /// (never modifies a file).
    Wal(wal::WalArgs),
    /// Print a snapshot file's metadata and counts, checking its checksum.
    Snapshot(snapshot::SnapshotArgs),
}

/// What reading found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Clean,
    Corrupt,
}

/// Runs a debug command; `json` prints one JSON object per line instead.
pub fn run(command: DebugCommand, json: bool) -> ExitCode {
    let mut out = Out::new(json);
    let result = match command {
        DebugCommand::Wal(args) => wal::run(&args, &mut out),
        DebugCommand::Snapshot(args) => snapshot::run(&args, &mut out),
    };
    let result = result.and_then(|verdict| out.flush().map(|()| verdict));
    match result {
        Ok(Verdict::Clean) => ExitCode::SUCCESS,
        Ok(Verdict::Corrupt) => ExitCode::from(1),
        // Whoever reads the output (`| head`) has seen what it wanted.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Standard output, as text lines or JSON lines.
struct Out {
    json: bool,
    writer: BufWriter<Stdout>,
}

impl Out {
    fn new(json: bool) -> Out {
        Out {
            json,
            writer: BufWriter::new(std::io::stdout()),
        }
    }

    /// One line: `value` as JSON, or the text `text` builds.
    fn line(
        &mut self,
        value: serde_json::Value,
        text: impl FnOnce() -> String,
    ) -> anyhow::Result<()> {
        if self.json {
            writeln!(self.writer, "{value}")?;
        } else {
            writeln!(self.writer, "{}", text())?;
        }
        Ok(())
    }

    /// Reports corruption: a line on stdout, in order with what was read,
    /// and `message` on stderr, where an operator or a script looks for
    /// errors.
    fn corrupt(&mut self, value: serde_json::Value, message: &str) -> anyhow::Result<()> {
        self.line(value, || format!("CORRUPT: {message}"))?;
        self.flush()?;
        eprintln!("error: {message}");
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.writer.flush()?;
        Ok(())
    }
}

/// Bytes as text: printable ASCII as is, anything else escaped (`\xNN`,
/// `\n`, `\"`), so a binary key prints on one line and reads back exactly.
fn escape(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_text_and_escapes_the_rest() {
        assert_eq!(escape(b"key/1"), "key/1");
        assert_eq!(escape(b"a\"b\\c"), "a\\\"b\\\\c");
        assert_eq!(escape(&[0, 0xff, b'\n']), "\\x00\\xff\\n");
    }
}
