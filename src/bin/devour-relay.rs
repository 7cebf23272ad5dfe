//! `devour-relay`: drains the outbox to Kafka.
fn main() -> std::process::ExitCode {
    devour::cli::relay_main()
}
