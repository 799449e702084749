//! Boot configuration: `--blockdev` and `--object` applied to a block layer.

use alloc::string::ToString;

use super::harness::Qmp;
use crate::cmdline::{Token, tokenize};

#[test]
fn blockdev_and_object_options_build_the_graph() {
    let q = Qmp::new();
    let line = r#"loglevel=info --object throttle-group,id=tg,limits.iops-total=100 --blockdev null-co,node-name=base,size=1048576,read-zeroes=on --blockdev {"driver": "throttle", "node-name": "thr", "throttle-group": "tg", "file": "base"} --blockdev driver=raw,node-name=ro,read-only=on,file.driver=null-co,file.size=4096 --nbd-server addr.type=inet"#;
    let mut kernel = alloc::vec::Vec::new();
    for t in tokenize(line).unwrap() {
        match t {
            Token::Option {
                name,
                value: Some(v),
            } => {
                if !q.bl.apply_boot_option(&name, &v).unwrap() {
                    kernel.push(name);
                }
            }
            other => kernel.push(alloc::format!("{other:?}")),
        }
    }
    assert_eq!(kernel, [r#"Word("loglevel=info")"#, "nbd-server"]);
    let reg = q.bl.registry();
    assert_eq!(reg.find_node("base").unwrap().get_length(), Ok(1048576));
    assert!(reg.find_node("ro").unwrap().read_only());
    assert_eq!(
        reg.find_node("ro")
            .unwrap()
            .file()
            .unwrap()
            .node()
            .get_length(),
        Ok(4096)
    );
    assert_eq!(
        reg.find_node("thr").unwrap().file().unwrap().node().name(),
        "base"
    );
    assert_eq!(reg.object_ids(), ["tg"]);
}

#[test]
fn bad_options_name_themselves() {
    let q = Qmp::new();
    let e = q.bl.boot_blockdev("null-co,node-name=n,foo=1").unwrap_err();
    assert_eq!(
        e.to_string(),
        "--blockdev null-co,node-name=n,foo=1: Parameter 'foo' is unexpected"
    );
    let e =
        q.bl.boot_blockdev("null-co,node-name=n,size=big")
            .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--blockdev null-co,node-name=n,size=big: Parameter 'size' expects integer"
    );
    let e =
        q.bl.boot_blockdev("null-co,node-name=n,read-zeroes=maybe")
            .unwrap_err();
    assert_eq!(
        e.to_string(),
        "--blockdev null-co,node-name=n,read-zeroes=maybe: Parameter 'read-zeroes' expects 'on' or 'off'"
    );
    let e = q.bl.boot_blockdev("null-co,size").unwrap_err();
    assert_eq!(
        e.to_string(),
        "--blockdev null-co,size: Expected '=' after parameter 'size'"
    );
    let e = q.bl.boot_blockdev(r#"{"driver": "null-co""#).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(r#"--blockdev {"driver": "null-co": "#),
        "{e}"
    );
    let e = q.bl.boot_object("iothread,id=io0").unwrap_err();
    assert_eq!(
        e.to_string(),
        "--object iothread,id=io0: Parameter 'qom-type' does not accept value 'iothread'"
    );
    assert!(q.bl.registry().nodes().is_empty());
}
