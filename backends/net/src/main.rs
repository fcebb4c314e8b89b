fn main() {
    std::process::exit(vhostbox_common::launch::main::<vhostbox_net::Net>());
}
