//! Operator commands a service embeds in its own binary, because they need its perspectives
//! (the standalone `whizbang` binary has none): today `replay PERSPECTIVE --from
//! scratch|checkpoint`, with its progress shown as it goes. Behind the cargo feature
//! `operator` (clap and indicatif); the library without it pulls in neither.
//!
//! The application flattens [`OperatorCommand`] into its own clap parser and hands the parsed
//! command a [`RuntimeBuilder`] with its perspectives registered:
//!
//! ```no_run
//! use clap::{Parser, Subcommand};
//! use whizbang::operator::OperatorCommand;
//! use whizbang::{Config, Runtime};
//!
//! #[derive(Parser)]
//! struct Args {
//!     #[command(subcommand)]
//!     command: Option<Cmd>,
//! }
//!
//! #[derive(Subcommand)]
//! enum Cmd {
//!     /// Runs the service (the default).
//!     Serve,
//!     #[command(flatten)]
//!     Operator(OperatorCommand),
//! }
//!
//! #[actix::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let builder = Runtime::builder(Config::load(std::path::Path::new("config/whizbang.toml"))?);
//!     // .read_model::<OrderCreated, _>("order-summary", summaries, Consistency::Async) ...
//!     match Args::parse().command {
//!         Some(Cmd::Operator(command)) => {
//!             command.run(builder).await?;
//!         }
//!         Some(Cmd::Serve) | None => { /* builder.start().await? ... */ }
//!     }
//!     Ok(())
//! }
//! ```
//!
//! SIGTERM or Ctrl-C stops a replay after the page it is applying, its checkpoint saved
//! ([`ReplayError::Stopped`]): `--from checkpoint` resumes there.
//!
//! It owns parsing these commands and showing their progress: an `indicatif` bar (events read
//! of the total, rate, ETA) when stderr is a terminal, plain lines on stderr otherwise, and a
//! closing summary on stdout. It must not decide what a rebuild from scratch clears in the
//! application's own read model: the application does that before it calls [`run`]
//! (see [`crate::replay`]).
//!
//! [`run`]: OperatorCommand::run

use crate::RuntimeBuilder;
use crate::replay::{ReplayError, ReplayFrom, ReplayProgress, ReplayReport, ReplayStop};
use std::io::{IsTerminal as _, Write};
use std::time::{Duration, Instant};

/// The commands a service adds to its command line (flatten it into a `Subcommand` enum).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum OperatorCommand {
    /// Rebuilds a perspective from the event store, or resumes it from its checkpoint.
    ///
    /// Reads the stored events of the perspective's types in position order and applies them,
    /// saving the checkpoint after every page and showing the progress. It does not start the
    /// service (no instance registered, no leases, nothing consumed), so it can run beside the
    /// running instances.
    Replay(ReplayArgs),
}

/// `replay PERSPECTIVE --from scratch|checkpoint`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The perspective's registered name.
    pub perspective: String,
    /// `scratch`: every stored event of the perspective's types, from position 0;
    /// `checkpoint`: only what was stored after its last checkpoint.
    #[arg(long, value_enum)]
    pub from: Start,
    /// Events read per page; the checkpoint is saved after each page.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub page_size: u32,
    /// How progress is shown: `auto` (a bar when stderr is a terminal, lines otherwise),
    /// `bar`, `lines` or `none`.
    #[arg(long, value_enum, default_value_t = ProgressStyle::Auto)]
    pub progress: ProgressStyle,
    /// Seconds between two progress lines; 0 prints one after every page.
    #[arg(long, default_value_t = 1.0, value_parser = seconds)]
    pub progress_interval: f64,
}

/// `--progress-interval`: a number of seconds from 0 to an hour.
fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.0..=3_600.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "`{text}` is not a number of seconds from 0 to 3600"
        )),
    }
}

/// Where a replay starts, on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Start {
    /// Position 0: a rebuild.
    Scratch,
    /// After the perspective's checkpoint: a resume.
    Checkpoint,
}

impl From<Start> for ReplayFrom {
    fn from(f: Start) -> ReplayFrom {
        match f {
            Start::Scratch => ReplayFrom::Scratch,
            Start::Checkpoint => ReplayFrom::Checkpoint,
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressStyle {
    /// A bar when stderr is a terminal, lines otherwise.
    Auto,
    /// An `indicatif` progress bar on stderr (drawn only when stderr is a terminal).
    Bar,
    /// Plain lines on stderr, at most one per `--progress-interval`.
    Lines,
    /// Nothing but the closing summary.
    None,
}

impl OperatorCommand {
    /// Runs the command with the perspectives registered on `builder`; progress goes to stderr
    /// and the closing summary to stdout.
    pub async fn run(self, builder: RuntimeBuilder) -> Result<ReplayReport, ReplayError> {
        self.run_with(builder, &mut std::io::stderr(), &mut std::io::stdout())
            .await
    }

    /// [`OperatorCommand::run`] writing the progress lines to `progress` and the summary to
    /// `summary` (the bar, when asked for, always draws on stderr).
    pub async fn run_with(
        self,
        builder: RuntimeBuilder,
        progress: &mut (dyn Write + Send),
        summary: &mut (dyn Write + Send),
    ) -> Result<ReplayReport, ReplayError> {
        match self {
            OperatorCommand::Replay(args) => replay(args, builder, progress, summary).await,
        }
    }
}

async fn replay(
    args: ReplayArgs,
    builder: RuntimeBuilder,
    out: &mut (dyn Write + Send),
    summary: &mut (dyn Write + Send),
) -> Result<ReplayReport, ReplayError> {
    let style = match args.progress {
        ProgressStyle::Auto if std::io::stderr().is_terminal() => ProgressStyle::Bar,
        ProgressStyle::Auto => ProgressStyle::Lines,
        other => other,
    };
    // Checked by the parser; a value set in code is clamped the same way.
    let interval = Duration::from_secs_f64(if args.progress_interval.is_finite() {
        args.progress_interval.clamp(0.0, 3_600.0)
    } else {
        1.0
    });
    let mut view = Progress::new(&args.perspective, style, interval, out);
    // SIGTERM or Ctrl-C: the replay stops after the page it is applying, its checkpoint saved.
    let stop = ReplayStop::new();
    let watcher = crate::StopSignal::new().ok().map(|mut signal| {
        let stop = stop.clone();
        actix::spawn(async move {
            signal.recv().await;
            stop.stop();
        })
    });
    let report = builder
        .replay_until(
            &args.perspective,
            args.from.into(),
            args.page_size,
            &mut |p| view.show(p),
            &stop,
        )
        .await;
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    view.finish();
    let report = report?;
    if report.stopped {
        return Err(ReplayError::Stopped {
            checkpoint: report.checkpoint,
            applied: report.applied,
        });
    }
    let _ = writeln!(
        summary,
        "replayed perspective {} from {}: {} events applied, checkpoint at position {}",
        args.perspective,
        match args.from {
            Start::Scratch => "scratch",
            Start::Checkpoint => "its checkpoint",
        },
        report.applied,
        report.checkpoint
    );
    Ok(report)
}

/// Draws [`ReplayProgress`] reports as a bar or as lines.
struct Progress<'a> {
    name: String,
    style: ProgressStyle,
    interval: Duration,
    out: &'a mut (dyn Write + Send),
    started: Instant,
    last_line: Option<Instant>,
    bar: Option<indicatif::ProgressBar>,
}

impl<'a> Progress<'a> {
    fn new(
        name: &str,
        style: ProgressStyle,
        interval: Duration,
        out: &'a mut (dyn Write + Send),
    ) -> Progress<'a> {
        let bar = (style == ProgressStyle::Bar).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            let template = "{prefix} [{bar:30}] {pos}/{len} events read, {msg}, ETA {eta}";
            if let Ok(s) = indicatif::ProgressStyle::with_template(template) {
                bar.set_style(s.progress_chars("=> "));
            }
            bar.set_prefix(format!("replay {name}"));
            bar
        });
        Progress {
            name: name.to_string(),
            style,
            interval,
            out,
            started: Instant::now(),
            last_line: None,
            bar,
        }
    }

    fn show(&mut self, p: &ReplayProgress) {
        if let Some(bar) = &self.bar {
            bar.set_length(p.total());
            bar.set_position(p.read());
            let secs = self.started.elapsed().as_secs_f64();
            let rate = if secs > 0.0 {
                p.read() as f64 / secs
            } else {
                0.0
            };
            bar.set_message(format!("{} applied, {rate:.0} events/s", p.applied));
            return;
        }
        if self.style != ProgressStyle::Lines {
            return;
        }
        let due = self
            .last_line
            .is_none_or(|at| at.elapsed() >= self.interval);
        if !(due || p.done) {
            return;
        }
        self.last_line = Some(Instant::now());
        let _ = writeln!(self.out, "{}", line(&self.name, p, self.started.elapsed()));
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        let _ = self.out.flush();
    }
}

/// One progress line: `replay NAME: READ/TOTAL events read (P%), N applied, R events/s, ETA E`,
/// or the closing `replay NAME: done, ...`.
fn line(name: &str, p: &ReplayProgress, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        p.read() as f64 / secs
    } else {
        0.0
    };
    if p.done {
        return format!(
            "replay {name}: done, {} events read, {} applied in {secs:.1}s ({rate:.0} events/s), checkpoint {}",
            p.read(),
            p.applied,
            p.position
        );
    }
    let percent = if p.total() == 0 {
        100.0
    } else {
        100.0 * p.read() as f64 / p.total() as f64
    };
    let eta = if p.read() == 0 || rate <= 0.0 {
        "unknown".to_string()
    } else {
        format!("{:.0}s", p.total().saturating_sub(p.read()) as f64 / rate)
    };
    format!(
        "replay {name}: {}/{} events read ({percent:.0}%), {} applied, {rate:.0} events/s, ETA {eta}",
        p.read(),
        p.total(),
        p.applied
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(position: u64, applied: u64, done: bool) -> ReplayProgress {
        ReplayProgress {
            start: 100,
            position,
            end: 300,
            applied,
            done,
        }
    }

    #[test]
    fn lines_say_how_far_how_fast_and_how_long() {
        assert_eq!(
            line("orders", &at(100, 0, false), Duration::ZERO),
            "replay orders: 0/200 events read (0%), 0 applied, 0 events/s, ETA unknown"
        );
        assert_eq!(
            line("orders", &at(150, 40, false), Duration::from_secs(2)),
            "replay orders: 50/200 events read (25%), 40 applied, 25 events/s, ETA 6s"
        );
        assert_eq!(
            line("orders", &at(300, 160, true), Duration::from_secs(4)),
            "replay orders: done, 200 events read, 160 applied in 4.0s (50 events/s), checkpoint 300"
        );
    }

    #[test]
    fn the_command_flattens_into_an_application_parser() {
        use clap::{Parser, Subcommand};
        #[derive(Parser)]
        struct App {
            #[command(subcommand)]
            command: Cmd,
        }
        #[derive(Subcommand)]
        enum Cmd {
            Serve,
            #[command(flatten)]
            Operator(OperatorCommand),
        }
        let app = App::try_parse_from(["svc", "replay", "orders", "--from", "scratch"]).unwrap();
        let Cmd::Operator(OperatorCommand::Replay(args)) = app.command else {
            panic!("replay parsed as another command");
        };
        assert_eq!(args.perspective, "orders");
        assert_eq!(args.from, Start::Scratch);
        assert_eq!(args.page_size, 500);
        assert_eq!(args.progress, ProgressStyle::Auto);
        assert!(
            App::try_parse_from(["svc", "replay", "orders"]).is_err(),
            "--from is required: a rebuild and a resume are different things"
        );
        assert!(App::try_parse_from(["svc", "replay", "orders", "--from", "x"]).is_err());
        for bad in ["NaN", "inf", "7200", "soon"] {
            assert!(
                App::try_parse_from([
                    "svc",
                    "replay",
                    "orders",
                    "--from",
                    "checkpoint",
                    "--progress-interval",
                    bad
                ])
                .is_err(),
                "--progress-interval {bad}"
            );
        }
        assert!(matches!(
            App::try_parse_from(["svc", "serve"]).unwrap().command,
            Cmd::Serve
        ));
    }
}
