//! The `mdsync` binary: parse, run, print the error chain once, exit with the documented code.
//! Everything else lives in the library and `cli`.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mdsync: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
