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
