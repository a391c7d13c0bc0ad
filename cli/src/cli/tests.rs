//! The command line as users type it.

use super::*;

#[test]
fn since_accepts_ages_and_timestamps() {
    assert_eq!(parse_since("2026-01-01T00:00:00Z").unwrap(), 1_767_225_600_000);
    let hour_ago = parse_since("1h").unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(now - hour_ago >= 3_600_000 && now - hour_ago < 3_660_000);
    assert!(parse_since("yesterday-ish").is_err());
}

#[test]
fn fuel_is_metered_where_limited_unless_told_otherwise() {
    use clap::Parser as _;
    let fuel_of = |args: &[&str]| -> Result<FuelMetering, clap::Error> {
        let cli = Cli::try_parse_from([&["shoal", "serve"], args].concat())?;
        match cli.command {
            Command::Serve { host, .. } => Ok(host.engine_options().fuel),
            _ => unreachable!("parsed serve"),
        }
    };
    assert_eq!(fuel_of(&[]).ok(), Some(FuelMetering::Limited));
    assert_eq!(fuel_of(&["--fuel", "every-request"]).ok(), Some(FuelMetering::EveryRequest));
    assert_eq!(fuel_of(&["--no-fuel"]).ok(), Some(FuelMetering::Off));
    let both = fuel_of(&["--no-fuel", "--fuel", "limited"]).unwrap_err().to_string();
    assert!(both.contains("cannot be used with"), "{both}");
}

#[test]
fn a_pair_is_key_equals_value() {
    assert_eq!(parse_pair("a=b=c").unwrap(), ("a".to_string(), "b=c".to_string()));
    assert_eq!(parse_pair("=x").unwrap_err().to_string(), "\"=x\": write KEY=VALUE");
}

#[test]
fn an_error_is_reported_with_each_cause_once() {
    let io = std::io::Error::other("disk full");
    let err = anyhow::Error::new(shoal::Error::io("/data/x")(io)).context("cannot deploy");
    assert_eq!(report(&err), "cannot deploy: /data/x: disk full");
    let plain = anyhow::anyhow!("inner").context("outer");
    assert_eq!(report(&plain), format!("{plain:#}"));
}

#[test]
fn the_cli_definition_is_consistent() {
    use clap::CommandFactory as _;
    Cli::command().debug_assert();
}

#[test]
fn the_plain_text_log_reads_as_tracings_own_with_hostile_values_escaped() {
    use tracing_subscriber::layer::SubscriberExt as _;
    /// Everything the layer writes, kept.
    #[derive(Clone, Default)]
    struct Kept(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Kept {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let log = |one_write: bool| {
        let kept = Kept::default();
        let writer = {
            let kept = kept.clone();
            move || kept.clone()
        };
        let ours = tracing_subscriber::fmt::layer().without_time().with_ansi(false).with_writer(writer.clone());
        let theirs = tracing_subscriber::fmt::layer().without_time().with_ansi(false).with_writer(writer);
        let subscriber = tracing_subscriber::registry()
            .with(one_write.then(|| ours.fmt_fields(OneWriteFields)))
            .with((!one_write).then_some(theirs));
        tracing::subscriber::with_default(subscriber, || {
            let long = "x".repeat(20_000);
            let span =
                tracing::info_span!("request", function = %"hello", request_id = "a\u{1b}[31mred", parent_id = "-");
            let _entered = span.enter();
            tracing::warn!(error = %long, "failed");
            let nested = tracing::info_span!("call", depth = 2);
            let _nested = nested.enter();
            tracing::info!(wall_us = 17, "served");
        });
        String::from_utf8(kept.0.lock().unwrap().clone()).unwrap()
    };
    let (ours, theirs) = (log(true), log(false));
    assert_eq!(ours, theirs);
    assert!(
        ours.contains("request{function=hello request_id=\"a\\u{1b}[31mred\" parent_id=\"-\"}:call{depth=2}"),
        "{ours}"
    );
    assert!(!ours.contains('\u{1b}'), "an escape sequence reached the log: {ours}");
}
