//! `devour`: configuration check, migrations and outbox inspection.
fn main() -> std::process::ExitCode {
    devour::cli::main()
}
