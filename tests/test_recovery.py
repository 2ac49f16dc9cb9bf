"""budget.recovery's price on the knapsack's options (compress/recovery.py), and what it changes."""
from compress.knapsack import solve
from compress.recovery import priced


def test_the_price_grows_with_the_square_of_the_share_removed_in_damage_units():
    options = [[(10.0, 0.0), (5.0, 1.0), (1.0, 3.0)], [(10.0, 0.0), (5.0, 2.0), (1.0, 5.0)]]
    kept = [[1.0, 0.5, 0.1], [1.0, 0.5, 0.1]]
    out = priced(options, kept, 2.0)
    spread = (3.0 + 5.0) / 2  # the mean range of the units' damage
    assert out[0][0] == (10.0, 0.0) and out[1][0] == (10.0, 0.0)  # the unit as it is: no price
    assert out[0][1] == (5.0, 1.0 + 2.0 * spread * 0.25) and out[1][2] == (1.0, 5.0 + 2.0 * spread * 0.81)
    assert priced(options, kept, 0.0) is options  # off: the options as they were


def test_a_priced_knapsack_spreads_the_cut_instead_of_starving_one_unit():
    """Least damage alone takes one unit down to a tenth and leaves the other whole; priced, both
    lose half (the same cost)."""
    options = [[(10.0, 0.0), (5.0, 1.0), (1.0, 1.2)], [(10.0, 0.0), (5.0, 1.1), (1.0, 5.0)]]
    kept = [[1.0, 0.5, 0.1], [1.0, 0.5, 0.1]]
    assert solve(options, 11.0).choice == [2, 0]
    assert solve(priced(options, kept, 1.0), 11.0).choice == [1, 1]
