"""`esper library list --origin` takes only the origins a blueprint can have: a misspelt one is
exit 2 naming it, as a misspelt --status is, not an empty list that reads as "none of those"."""

from __future__ import annotations

from typer.testing import CliRunner

from esper.blueprints import standard_library
from esper_cli.main import app


def test_list_by_origin_and_an_unknown_origin_is_exit_2(ws):
    def esper(*args: str):
        return CliRunner().invoke(app, ["--workspace", str(ws.root), "--json", *args],
                                  catch_exceptions=False)

    listed = esper("library", "list", "--origin", "library")
    assert listed.exit_code == 0 and '"origin": "library"' in listed.stdout
    assert listed.stdout.count('"origin": "library"') == len(standard_library())
    assert esper("library", "list", "--origin", "karn").stdout.strip() == "[]"

    typo = esper("library", "list", "--origin", "libary")
    assert typo.exit_code == 2 and typo.stdout == ""
    assert typo.stderr.strip() == ("error: --origin: unknown origin 'libary'; choose from "
                                   "library, human, karn")


def test_an_option_of_the_other_kind_is_exit_2_not_ignored(ws):
    """--tag and --target filter kernels, --origin blueprints: given with the other --kind they
    would be ignored and list everything, which reads as "all of these match"."""
    def esper(*args: str):
        return CliRunner().invoke(app, ["--workspace", str(ws.root), "library", "list", *args],
                                  catch_exceptions=False)

    for args, option in ((["--tag", "low_memory"], "--tag"), (["--target", "cpu"], "--target"),
                         (["--kind", "kernels", "--origin", "library"], "--origin")):
        refused = esper(*args)
        assert refused.exit_code == 2 and refused.stdout == "", refused.output
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith(f"error: {option} ") and "--kind" in line, line
    assert esper("--kind", "kernels", "--tag", "low_memory", "--target", "cpu").exit_code == 0
