from django.db import migrations, models


class Migration(migrations.Migration):
    """Transaction kinds for money in and out (marketplace.payments): ``topup``, ``payout_hold``
    and ``payout_release``."""

    dependencies = [
        ('ledger', '0007_transaction_kind_forfeit'),
    ]

    operations = [
        migrations.AlterField(
            model_name='transaction',
            name='kind',
            field=models.CharField(choices=[('grant', 'Grant'), ('hold', 'Hold'), ('capture', 'Capture'), ('release', 'Release'), ('payout', 'Payout'), ('clawback', 'Clawback'), ('forfeit', 'Forfeit'), ('topup', 'Topup'), ('payout_hold', 'Payout Hold'), ('payout_release', 'Payout Release')], max_length=16),
        ),
    ]
