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
    let fuel_of = |args: &[&str]| -> Result<FuelMetering, String> {
        let cli = Cli::try_parse_from([&["shoal", "serve"], args].concat()).map_err(|err| err.to_string())?;
        match cli.command {
            Command::Serve { host, .. } => Ok(host.engine_options().fuel),
            _ => unreachable!("parsed serve"),
        }
    };
    assert_eq!(fuel_of(&[]), Ok(FuelMetering::Limited));
    assert_eq!(fuel_of(&["--fuel", "every-request"]), Ok(FuelMetering::EveryRequest));
    assert_eq!(fuel_of(&["--no-fuel"]), Ok(FuelMetering::Off));
    let both = fuel_of(&["--no-fuel", "--fuel", "limited"]).unwrap_err();
    assert!(both.contains("cannot be used with"), "{both}");
}

#[test]
fn the_cli_definition_is_consistent() {
    use clap::CommandFactory as _;
    Cli::command().debug_assert();
}
