mod cli;

fn main() -> std::process::ExitCode {
    metapeft::runtime::configure_threads();
    cli::run()
}
