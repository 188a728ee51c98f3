from kvmlab.apt import Package, _control_fields, depends_names, source_uris

DEB822 = """Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
"""
ONE_LINE = "deb [arch=amd64] https://mirror.example/debian bullseye main\n# deb http://old/debian x main\n"


def test_source_uris_both_styles():
    assert source_uris(DEB822, deb822=True) == ["http://mirror.example/debian"]
    assert source_uris(ONE_LINE, deb822=False) == ["https://mirror.example/debian"]


def test_control_fields_first_stanza_only():
    text = "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nVersion: 2\n"
    assert _control_fields(text) == {"Package": "a", "Version": "1", "Description": "x"}


def test_depends_names():
    depends = "linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1), a | b, c"
    assert depends_names(depends) == ["linux-image-6.1.0-50-cloud-amd64", "a", "c"]


def test_package_key_names_content():
    package = Package("linux-image-x", "1.0", "ab" * 32, 10, "bookworm")
    assert package.key == "linux-image-x_1.0_abababababab"
