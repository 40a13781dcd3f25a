mod cli;

fn main() -> std::process::ExitCode {
    metapeft::runtime::configure_threads();
    metapeft::runtime::configure_allocator();
    metapeft::runtime::run_on_pool(cli::run)
}
