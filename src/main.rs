//! `vblkcache`: parse arguments, validate them into a `Config`, run.

use clap::Parser;
use std::process::ExitCode;
use vblkcache::cli::Args;
use vblkcache::config::Config;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // clap's first line names the argument; the rest is a usage hint.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("vblkcache: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vblkcache: {e}");
            return ExitCode::from(2);
        }
    };
    match vblkcache::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vblkcache: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
