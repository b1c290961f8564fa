fn main() -> std::process::ExitCode {
    tarpit::cli::main()
}
